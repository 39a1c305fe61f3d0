"""Shared fixtures: one MLflow SQLite store and one local Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
torch.set_num_threads(1)

# Hypothesis: examples it finds failing are kept in the repository (tests/hypothesis-examples,
# written by local runs, committed) and replayed first; CI reads them without writing, and
# `make test` passes --hypothesis-seed=0 there, so every CI run draws the same examples.
from hypothesis import settings as _hyp_settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase  # noqa: E402

_EXAMPLES = DirectoryBasedExampleDatabase(str(ROOT / "tests" / "hypothesis-examples"))
_hyp_settings.register_profile("dev", database=_EXAMPLES)
_hyp_settings.register_profile("ci", database=ReadOnlyDatabase(_EXAMPLES), print_blob=True)
_hyp_settings.load_profile("ci" if os.environ.get("CI") else "dev")

# In CI a skipped test fails the run unless .ci/allowed-skips names it (a skip is a test
# that proved nothing: a missing browser or service must not turn CI green).
ALLOWED_SKIPS = ROOT / ".ci" / "allowed-skips"
_skipped: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A whole module skipped at collection (``pytest.skip(allow_module_level=True)``,
    ``importorskip``) counts as a skip too."""
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def _allowed() -> set[str]:
    if not ALLOWED_SKIPS.is_file():
        return set()
    return {line.split("#", 1)[0].strip() for line in ALLOWED_SKIPS.read_text().splitlines()} - {""}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # under pytest-xdist the controller sees every worker's reports and decides (once)
    if not os.environ.get("CI") or hasattr(session.config, "workerinput"):
        return
    allowed = _allowed()
    bad = [(n, r) for n, r in _skipped if n.split("[", 1)[0] not in allowed]
    if bad:
        for nodeid, reason in bad:
            print(f"\nci: skipped test not in .ci/allowed-skips: {nodeid} ({reason})")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# `make test` runs two lanes (tests/lanes.py), each one pytest process in a cpu cgroup of equal
# weight (two pytest-xdist workers on the 2-core CI machine overlapped two real-Ray modules and
# timed out: BENCHMARKS.md's CI table). Within a lane the modules with real Ray runs, servers and
# signals go first so that a broken cluster path fails the run early; the order within a module
# is the file's, and no test depends on the order.
SLOW_MODULES = (
    "tests/orchestrator/test_reliability.py",
    "tests/orchestrator/test_s3_storage.py",
    "tests/orchestrator/test_compare.py",
    "tests/orchestrator/test_autoscaling.py",
    "tests/orchestrator/test_sweep.py",
    "tests/orchestrator/test_cluster.py",
    "tests/orchestrator/test_console.py",
    "tests/orchestrator/test_train.py",
    "tests/orchestrator/test_mlflow_server.py",
    "tests/orchestrator/test_train_parquet.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {m: i for i, m in enumerate(SLOW_MODULES)}
    items.sort(key=lambda it: rank.get(it.nodeid.split("::", 1)[0], len(SLOW_MODULES)))  # stable


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """``orchestrator.cli.main`` installs a SIGTERM handler (stop like Ctrl-C); a test calling it
    in process must not leave it, or any other, on the pytest process."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        if signal.getsignal(s) is not handler and handler is not None:
            signal.signal(s, handler)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sprout-session")


@pytest.fixture(scope="session")
def mlflow_uri(session_dir: Path) -> str:
    uri = f"sqlite:///{session_dir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture
def ray_local(mlflow_uri: str, session_dir: Path):
    """A real local Ray instance (started once, reused; re-started if a test shut it down)."""
    import ray

    os.environ["SPROUT_DEBUG_DIR"] = str(session_dir / "debug")
    from orchestrator.session import ensure_ray

    if ray.is_initialized() and os.environ.get("MLFLOW_TRACKING_URI") != mlflow_uri:
        ray.shutdown()
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    ensure_ray()
    yield ray


def digits_cfg(tmp: Path, *overrides: str):
    from orchestrator.config import load_config

    base = [f"storage.path={tmp / 'ray_results'}", "eval.attacks=[]", "train.epochs=3",
            "train.checkpoint_keep=10", "train.val_pgd_steps=5"]
    return load_config(DIGITS, [*base, *overrides])
