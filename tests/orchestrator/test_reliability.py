"""Reliability and security under faults and bad input (issue 7), with real processes.

Every fault is injected into the real thing: a real ``sprout train`` process killed with
SIGKILL or stopped with SIGTERM and Ctrl-C, a real ``mlflow server`` stopped and restarted, a real
simulated Ray cluster losing its only worker node. ``docs/reliability.md`` lists each test here
with the fault and the observed outcome, and those that other modules' runs carry (the exploding
learning rate: test_console.py; ``sprout compare`` stopped by SIGTERM and Ctrl-C: test_s3_storage.py).

Order does not matter: ``ray_local`` starts the shared in-process Ray when it is not running,
the tests that run ``sprout`` subprocesses shut it down first (one Ray instance at a time), and
the simulated-cluster test restores it afterwards (``own_ray``). They are grouped that way
only to start Ray as few times as possible.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orchestrator import tracking
from orchestrator.config import ConfigError, ExperimentConfig, flatten, load_config
from tests.conftest import DIGITS, ROOT, digits_cfg
from tests.services import MLFLOW_JOB_PROCESSES, MLFLOW_SERVER_ENV, group_cmdlines
from tests.services import group_pids as _group_alive  # the killed driver's Ray processes included

PY = sys.executable
BIN = Path(sys.executable).parent
PER_EPOCH = ["train/loss", "train/acc", "val/clean_acc", "val/pgd_acc", "time/epoch_s", "time/samples_per_s"]
# Slow enough epochs (seconds, not the ~0.4 s of digits) that a signal lands mid-run.
SLOW_DATA = ["data.name=synthetic", "data.num_samples=4000", "data.image_size=16", "data.channels=3"]
HANG_GUARD_S = 600  # only a guard against hangs, never a performance assertion


# ----------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(c, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def _runs_with_key(c, experiment: str, key: str) -> list:
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.RUN_KEY}` = '{key}'")


def _nonblank(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _reap_group(pgid: int, timeout_s: float = 60.0) -> None:
    """Wait until the group is gone; SIGKILL what is left after ``timeout_s`` (cleanup only)."""
    deadline = time.time() + timeout_s
    while _group_alive(pgid) and time.time() < deadline:
        time.sleep(0.5)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _listening(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state held by one of ``pids`` (/proc/net/tcp{,6})."""
    import ipaddress

    by_inode: dict[str, tuple[str, int]] = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # LISTEN
                continue
            addr, port = f[1].split(":")
            raw = bytes.fromhex(addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.IPv6Address(raw) if v6 else ipaddress.IPv4Address(raw)
            if v6 and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            by_inode[f[9]] = (str(ip), int(port, 16))
    out = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in by_inode:
                out.add(by_inode[target[8:-1]])
    return out


def _descendants(pid: int) -> list[int]:
    """``pid``'s live child processes, their children, and so on."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop_processes(pids: list[int], timeout_s: float = 30.0) -> None:
    """SIGTERM exactly these processes (ours), SIGKILL what is left after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout_s
        while any(_alive(p) for p in pids) and time.time() < deadline:
            time.sleep(0.2)
        if not any(_alive(p) for p in pids):
            return


def _train_cmd(name: str, sets: list[str]) -> list[str]:
    return [PY, "-m", "orchestrator", "train", str(DIGITS), "--name", name, *[a for s in sets for a in ("--set", s)]]


def _train_env(store_uri: str, debug: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=store_uri, SPROUT_DEBUG_DIR=str(debug), **extra)
    env.pop("RAY_ADDRESS", None)
    return env


def _wait_for_epochs(proc: subprocess.Popen, c, experiment: str, key: str, n: int, run_dir: Path) -> str:
    """Poll MLflow until ``n`` epochs are logged and Ray has registered the checkpoint of epoch ``n``."""
    deadline = time.time() + HANG_GUARD_S
    while True:
        assert proc.poll() is None, f"sprout train exited ({proc.returncode}) before it could be interrupted"
        if not (time.time() < deadline):
            pytest.fail(f"no {n} epoch(s) logged in time")
        runs = _runs_with_key(c, experiment, key)
        if runs and len(_steps(c, runs[0].info.run_id, "train/loss")) >= n and _latest_ckpt_epoch(run_dir) >= n:
            return runs[0].info.run_id
        time.sleep(0.25)


def _sigint_as_in_a_terminal() -> None:
    """``Popen`` preexec: the child takes Ctrl-C as a terminal's foreground job does (Python's
    KeyboardInterrupt), even when pytest inherited SIGINT ignored, as a job started with ``&``
    from a script does (``exec`` keeps an ignored signal ignored, so the child would never stop)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _latest_ckpt_epoch(run_dir: Path) -> int:
    """1-based epoch of the checkpoint Ray would resume from (0: none yet)."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return 0
    return int((latest.get("metrics") or {}).get("epoch", 0))


def _record_pid(debug: Path, epoch: int) -> int:
    return json.loads((debug / f"worker-0-epoch-{epoch}.json").read_text())["pid"]


def _assert_secret_never_logged(store: Path, artifacts: Path, run, secret: str) -> None:
    """The secret env var is in no param, tag or artifact, nor anywhere in the store's files."""
    assert all(secret not in v and "SPROUT_TEST_SECRET" not in k for k, v in run.data.params.items())
    assert all(secret not in v for v in run.data.tags.values())
    blobs = [p for p in store.parent.glob(store.name + "*") if p.is_file()]
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files), f"no logged artifacts under {artifacts}: nothing was checked"
    blobs += files
    for p in blobs:
        assert secret.encode() not in p.read_bytes(), f"the secret leaked into {p}"


# ------------------------------------------------ 6. bad input: property-based fuzzing

_DEFAULTS = flatten(ExperimentConfig().to_dict())
_FIELDS = sorted(_DEFAULTS)
_SECTIONS = sorted({k.split(".")[0] for k in _FIELDS})
_ident = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=10)
_keys = st.one_of(
    st.sampled_from(_FIELDS),
    st.sampled_from(_SECTIONS),
    st.builds(lambda s, k: f"{s}.{k}", st.sampled_from(_SECTIONS), _ident),
    st.lists(_ident, min_size=1, max_size=4).map(".".join),
    st.text(min_size=0, max_size=20),
)
_raw_values = st.one_of(
    st.sampled_from(["-1", "0", "1", "1.5", "-0.1", "1e400", ".nan", ".inf", "true", "null", "~", "", "[]", "{}",
                     "[pgd20]", "[pgd7]", "[unclosed", "{a: 1}", "abc", "'quoted'", "8/255", "cuda", "step",
                     "!!binary aGVsbG8=", "!!set {a, b}", "2026-01-01", "0x10", "!!python/name:os.system",
                     "&a [*a]", "*undefined", "{train: {epochs: 2}}", "\"a\\0b\"", "\"line\\nbreak\""]),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=30),
)
_set_items = st.one_of(st.builds(lambda k, v: f"{k}={v}", _keys, _raw_values), st.text(max_size=30))
_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20),
                     st.floats(allow_nan=True), st.text(max_size=20), st.sampled_from(["pgd20", "cifar10", "step"]))
_yaml_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.sampled_from(_FIELDS + _SECTIONS), _ident), inner, max_size=3)),
    max_leaves=8,
)
_mapping_keys = st.one_of(st.sampled_from(_SECTIONS + ["method", "experiment"]), _ident,
                          st.integers(min_value=-5, max_value=5), st.booleans())
_mappings = st.dictionaries(_mapping_keys, _yaml_values, min_size=1, max_size=5)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _mentions(msg: str, name: str) -> bool:
    """``name`` appears in ``msg`` as a whole word (so a key ``a`` is not "named" by any "a" in the text)."""
    import re

    return any(re.search(r"(?<![\w.])" + re.escape(n) + r"(?!\w)", msg) for n in {name, repr(name)[1:-1]} if n)


def _names_a_field(msg: str, keys: list[str]) -> bool:
    """The message names one of the given (dotted) keys, a dotted prefix of one, or ``--set``."""
    if "--set" in msg:
        return True
    for key in keys:
        parts = key.strip().split(".")
        for i in range(len(parts), 0, -1):
            if _mentions(msg, ".".join(parts[:i])):
                return True
    return False


def test_names_a_field_needs_the_key_as_a_word() -> None:
    assert _names_a_field("unknown key 'a' in section train", ["a"])
    assert _names_a_field("train.epochs: must be >= 1", ["train.epochs"])
    assert _names_a_field("unknown key 'train.bogus'", ["train.bogus.x"])
    assert not _names_a_field("value must be an integer", ["a"])
    assert not _names_a_field("train.epochs: must be >= 1", ["t"])
    assert not _names_a_field("sprout.dirichlet_alpha: bad", ["alpha"])


def _check_one_line(err: ConfigError) -> str:
    msg = str(err)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg and "\r" not in msg, f"error is not one line: {msg!r}"
    assert "Traceback" not in msg
    return msg


@FUZZ
@given(items=st.lists(_set_items, min_size=1, max_size=3))
# regressions found by this test: a control character in a value, a newline in a key, a NUL in a path
@example(items=["train.epochs=\x1f"])
@example(items=["method.x\ny=1"])
@example(items=["a\nb=[unclosed"])
@example(items=['storage.path="a\\0b"'])
@example(items=['data.root="a\\0b"'])
def test_fuzzed_set_overrides_give_a_config_or_one_line_config_error(items: list[str]) -> None:
    try:
        cfg = load_config(DIGITS, items)
    except ConfigError as e:  # any other exception type fails the test
        msg = _check_one_line(e)
        keys = [i.partition("=")[0] for i in items]
        assert _names_a_field(msg, keys), f"{msg!r} names none of {keys!r}"
    else:
        assert isinstance(cfg, ExperimentConfig)


@FUZZ
@given(mapping=_mappings)
@example(mapping={"storage": {"path": "a\x00b"}})
def test_fuzzed_yaml_mappings_give_a_config_or_one_line_config_error(mapping: dict, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c.yaml"
    path.write_text(yaml.safe_dump(mapping, allow_unicode=True))
    try:
        cfg = load_config(path)
    except ConfigError as e:
        msg = _check_one_line(e)
        keys = [k for k in flatten({str(k): v for k, v in mapping.items()})] + [str(k) for k in mapping]
        assert _names_a_field(msg, keys) or str(path) in msg, f"{msg!r} names none of {keys!r}"
    else:
        assert isinstance(cfg, ExperimentConfig)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
@example(text="\x1f")
def test_fuzzed_config_files_give_a_config_or_one_line_config_error(text, tmp_path_factory) -> None:
    path = tmp_path_factory.mktemp("fuzzfile") / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        load_config(path)
    except ConfigError as e:
        _check_one_line(e)


def test_unsafe_yaml_tags_are_refused_and_never_executed(tmp_path, monkeypatch, capsys) -> None:
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.yaml"
    bad.write_text('experiment: !!python/object/apply:os.system ["touch pwned"]\nmethod: natural\n')
    with pytest.raises(ConfigError, match="malformed YAML|could not determine a constructor"):
        load_config(bad)
    with pytest.raises(ConfigError, match="--set experiment"):
        load_config(DIGITS, ['experiment=!!python/object/apply:os.system ["touch pwned"]'])
    assert main(["validate", str(bad)]) == 2
    assert len(_nonblank(capsys.readouterr().err)) == 1
    assert not (tmp_path / "pwned").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.yaml"]


# --------------------------------------------------------------- 7. security defaults


def test_make_ui_binds_loopback_only(tmp_path) -> None:
    """The command ``make ui`` runs (``make -n ui``), started on a free port: its sockets are loopback."""
    import shlex

    made = subprocess.run(["make", "-s", "-n", "ui"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    line = next(ln for ln in made.stdout.splitlines() if "mlflow ui" in ln or "mlflow server" in ln)
    argv = shlex.split(line)
    env = dict(os.environ)
    while "=" in argv[0]:  # the line's own VAR=value prefix, as the shell would apply it
        k, v = argv.pop(0).split("=", 1)
        env[k] = v
    port = _free_port()
    argv[argv.index("--port") + 1] = str(port)
    argv[argv.index("--backend-store-uri") + 1] = f"sqlite:///{tmp_path / 'ui.db'}"
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, "make ui's mlflow exited"
            if not (time.time() < deadline):
                pytest.fail("make ui's mlflow never answered")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        socks = _listening([proc.pid, *_descendants(proc.pid)])
        assert (("127.0.0.1", port) in socks) and {ip for ip, _ in socks} == {"127.0.0.1"}, sorted(socks)
        # and without MLflow 3's job executor (8 processes sprout never uses), as on the cluster's head
        time.sleep(1)  # (the executor starts its processes before the server answers; a margin)
        jobs = [c for c in group_cmdlines(proc.pid) if any(j in c for j in MLFLOW_JOB_PROCESSES)]
        assert not jobs, jobs
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        _reap_group(proc.pid, 30)


# ---------------------------------------------------------------- 5. MLflow unavailable


@pytest.fixture
def ray_tmpdir():
    """A fresh, empty folder as Ray's temp root (``RAY_TMPDIR``): a Ray that starts writes ``ray/`` there.
    Short and under /tmp: Ray's socket paths must fit 107 bytes."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_mlflow_down_at_start_is_one_clear_line_before_anything_starts(tmp_path, ray_tmpdir) -> None:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{_free_port()}", RAY_TMPDIR=str(ray_tmpdir))
    env.pop("RAY_ADDRESS", None)
    # eval.attacks=[]: digits' transfer attack needs a source outside compare (a config error, exit 2)
    out = subprocess.run([PY, "-m", "orchestrator", "train", str(DIGITS), "--set", "eval.attacks=[]"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    lines = _nonblank(out.stderr)
    assert len(lines) == 1 and "not reachable" in lines[0] and "MLFLOW_TRACKING_URI" in lines[0], lines
    assert "Ray" not in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # no ray_results, no mlflow.db, nothing
    assert list(ray_tmpdir.iterdir()) == []  # Ray never started


_CPUS = os.cpu_count() or 1
_TOO_BIG = f"scaling.num_workers={4 * _CPUS}"  # twice the host's cores at digits' 0.5 CPU per worker
_PLAN_MSG = (f"sprout: config error: scaling: the plan needs {{need}} CPU but the cluster has {_CPUS} CPU; lower "
             "scaling.num_workers, scaling.cpus_per_worker or scaling.gpus_per_worker (or set scaling.use_gpu: false)")


@pytest.mark.parametrize(("argv", "line"), [
    (["train", str(DIGITS), "--set", "sprout.dirichlet_alpha=7"], "sprout.dirichlet_alpha"),
    # (digits lists `transfer`, which `train` refuses without a source before it checks the plan)
    (["train", str(DIGITS), "--set", _TOO_BIG, "--set", "eval.attacks=[pgd20]"], _PLAN_MSG.format(need=f"{2 * _CPUS:g}")),
    (["validate", str(DIGITS), "--set", _TOO_BIG], _PLAN_MSG.format(need=f"{2 * _CPUS:g}")),
    # a trial of a comparison or sweep also needs its Tune driver's 0.01 CPU
    (["compare", str(DIGITS), "--set", _TOO_BIG], _PLAN_MSG.format(need=f"{2 * _CPUS + 0.01:g}")),
    (["sweep", str(DIGITS), "--space", "sensitivity_small", "--set", _TOO_BIG],
     _PLAN_MSG.format(need=f"{2 * _CPUS + 0.01:g}")),
    (["sweep", str(DIGITS), "--space", "nope"], "unknown search space 'nope'"),
], ids=["bad-value", "train-plan", "validate-plan", "compare-plan", "sweep-plan", "bad-space"])
def test_refused_commands_touch_neither_ray_nor_mlflow(argv, line, tmp_path, ray_tmpdir) -> None:
    """Exit 2 with one line, and nothing written: not in the working directory (``./mlflow.db``, the
    default store, and ``./ray_results``), not in Ray's temp root; MLFLOW_TRACKING_URI is unset."""
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmpdir))
    for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(k, None)
    out = subprocess.run([PY, "-m", "orchestrator", *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = _nonblank(out.stderr)
    assert len(lines) == 1 and line in lines[0], lines
    assert list(tmp_path.iterdir()) == []
    assert list(ray_tmpdir.iterdir()) == []


class _MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 over one SQLite store, stopped and restarted at will."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.store = root / "m.db"
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.store}",
             "--default-artifact-root", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.root, stdout=log, stderr=log, start_new_session=True, env={**os.environ, **MLFLOW_SERVER_ENV},
        )
        deadline = time.time() + 240
        while True:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            if not (time.time() < deadline):
                pytest.fail("mlflow server never answered /health")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except ProcessLookupError:
            pass
        _reap_group(self.proc.pid, 30)
        self.proc = None
        with pytest.raises(OSError):  # really down
            urllib.request.urlopen(self.uri + "/health", timeout=2)


@pytest.mark.slow
def test_mlflow_down_mid_run_buffers_then_delivers_exactly_once_or_falls_back_to_replay(
        tmp_path, monkeypatch) -> None:
    from orchestrator.tracking import MetricLogger

    # One attempt per call instead of MLflow's 7 retries with back-off (minutes per call):
    # the logger's own buffering is what is under test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    server = _MlflowServer(tmp_path, _free_port())
    values = {s: {"train/loss": 1.0 / s, "val/clean_acc": 0.1 * s} for s in range(1, 6)}
    try:
        server.start()
        c = tracking.client(server.uri)
        exp_id = c.create_experiment("reliability-outage")
        run_id, other_id = (c.create_run(exp_id).info.run_id for _ in range(2))
        fallback = tmp_path / "rr" / "run" / "mlflow_pending.jsonl"
        logger = MetricLogger(server.uri, run_id, fallback=fallback)
        logger.log(values[1], step=1)
        assert not logger.pending

        server.stop()  # the tracking server goes away mid-run
        logger.log(values[2], step=2)
        logger.log(values[3], step=3)
        assert len(logger.pending) == 4  # buffered, no exception
        rows = [json.loads(line) for line in fallback.read_text().splitlines()]  # and on file, whole
        assert sorted((r["key"], r["step"], r["value"]) for r in rows) == sorted(
            (k, s, values[s][k]) for s in (2, 3) for k in values[s])

        # The worker is killed: the restarted worker's logger takes the file over. The file also
        # names step 1 (as if a kill came between a delivery and the file's removal) and holds
        # another run's row, which stays for replay-metrics.
        other = json.dumps({"run_id": other_id, "key": "train/loss", "value": 9.0, "timestamp": 1, "step": 7}) + "\n"
        with fallback.open("a") as f:
            f.write(json.dumps({"run_id": run_id, "key": "train/loss", "value": 1.0, "timestamp": 1, "step": 1})
                    + "\n" + other)
        logger = MetricLogger(server.uri, run_id, fallback=fallback)
        assert len(logger.pending) == 5

        server.start()  # it comes back: the next epoch's log delivers the backlog
        logger.log(values[4], step=4)
        assert not logger.pending
        for key in values[1]:
            hist = c.get_metric_history(run_id, key)
            assert sorted(m.step for m in hist) == [1, 2, 3, 4], key
            assert {m.step: m.value for m in hist} == {s: values[s][key] for s in range(1, 5)}
        assert fallback.read_text() == other  # delivered rows gone, the other run's kept
        # a restarted worker (new logger) replaying epoch 4 does not log it twice
        MetricLogger(server.uri, run_id).log(values[4], step=4)
        assert _steps(c, run_id, "train/loss") == [1, 2, 3, 4]

        server.stop()  # down again when the run ends: the rest goes to the fallback file
        logger.log(values[5], step=5)
        logger.close(retries=1, wait_s=0.1)
        assert not logger.pending
        rows = [json.loads(line) for line in fallback.read_text().splitlines()]
        assert {(r["run_id"], r["key"], r["step"]) for r in rows} == {(run_id, k, 5) for k in values[5]} | {
            (other_id, "train/loss", 7)}

        server.start()
        env = dict(os.environ, MLFLOW_TRACKING_URI=server.uri)
        out = subprocess.run([PY, "-m", "orchestrator", "replay-metrics", str(fallback)], env=env,
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "delivered 3 metric values" in out.stdout
        assert not fallback.exists()
        assert [(m.step, m.value) for m in c.get_metric_history(other_id, "train/loss")] == [(7, 9.0)]
        for key in values[1]:
            hist = c.get_metric_history(run_id, key)
            assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5], key
            assert {m.step: m.value for m in hist} == {s: values[s][key] for s in range(1, 6)}
    finally:
        server.stop()


# ------------------------------------------------------ on the shared in-process Ray


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_down_during_a_real_sprout_train_is_buffered_and_delivered_once(
        ray_local, tmp_path, session_dir, monkeypatch) -> None:
    """``sprout train`` (in this process, on the shared Ray) logging to a real ``mlflow server`` that
    is stopped while epochs 2 and 3 are logged and back for epoch 4, with rank 0 SIGKILLed as epoch
    3 starts (epoch 2's metrics then exist only in the dead worker's buffer and its fallback file):
    the run finishes (exit 0), every per-epoch metric has steps 1..4 exactly once, nothing is left
    for ``replay-metrics``."""
    from orchestrator.cli import main

    server = _MlflowServer(tmp_path, _free_port())
    name, epochs = f"outage-{uuid.uuid4().hex[:6]}", 4
    debug = session_dir / "debug" / name
    debug.mkdir(parents=True)
    rr = tmp_path / "rr"
    pending = rr / name / "mlflow_pending.jsonl"
    sets = [f"storage.path={rr}", "experiment=test-reliability-outage", f"train.epochs={epochs}", "eval.attacks=[]",
            "train.val_pgd_steps=2", "train.checkpoint_keep=10", *SLOW_DATA]
    box: dict = {}
    try:
        server.start()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        (debug / "pause-at-epoch").write_text("1")  # rank 0 holds at the start of epoch 2 ...
        th = threading.Thread(target=lambda: box.setdefault("code", main(
            ["train", str(DIGITS), "--name", name, *[a for x in sets for a in ("--set", x)]])), daemon=True)
        th.start()

        def wait_for(path: Path) -> None:
            deadline = time.time() + HANG_GUARD_S
            while not path.exists():
                if not (th.is_alive() and time.time() < deadline):
                    pytest.fail(f"{path.name} never appeared: {box}")
                time.sleep(0.05)

        wait_for(debug / "paused-at-epoch-1")
        server.stop()  # ... while the tracking server goes away
        # While it is held: die as epoch 3 starts (after epoch 2's checkpoint is registered), and
        # hold the restarted worker before epoch 4. Written whole (rename): the hooks poll them.
        for drill, epoch in (("kill-at-epoch", 2), ("pause-at-epoch", 3)):
            (debug / f"{drill}.tmp").write_text(str(epoch))
            (debug / f"{drill}.tmp").replace(debug / drill)
        (debug / "resume").write_text("")
        wait_for(debug / "killed-at-epoch-2")  # epoch 2 was logged while down, then rank 0 died
        (debug / "resume").unlink()
        wait_for(debug / "paused-at-epoch-3")  # the restarted rank 0 logged epoch 3 while down
        assert (debug / "paused-at-epoch-3").read_text() != (debug / "killed-at-epoch-2").read_text()  # new pid
        held = [json.loads(line) for line in pending.read_text().splitlines()]
        assert sorted({r["step"] for r in held if r["key"] == "train/loss"}) == [2, 3]  # the dead worker's too
        server.start()
        (debug / "resume").write_text("")
        th.join(timeout=HANG_GUARD_S)
        assert not th.is_alive() and box.get("code") == 0, box
        c = tracking.client(server.uri)
        runs = _runs_with_key(c, "test-reliability-outage", name)
        assert len(runs) == 1 and c.get_run(runs[0].info.run_id).info.status == "FINISHED"
        for key in PER_EPOCH:
            assert _steps(c, runs[0].info.run_id, key) == list(range(1, epochs + 1)), key
        assert not list(rr.rglob("mlflow_pending.jsonl"))
    finally:
        (debug / "resume").write_text("")
        server.stop()


@pytest.mark.ray
def test_local_ray_dashboard_is_loopback_and_token_auth_is_enforced(ray_local) -> None:
    import ray._private.worker as ray_worker

    dash = ray_worker.get_dashboard_url()
    assert dash.rsplit(":", 1)[0] == "127.0.0.1", dash
    # the socket itself: the dashboard / job API port of this process's Ray listens on loopback only
    socks = _listening(_descendants(os.getpid()))
    assert {ip for ip, port in socks if port == int(dash.rsplit(":", 1)[1])} == {"127.0.0.1"}, sorted(socks)
    ray_cli = str(BIN / "ray")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    denied = subprocess.run([ray_cli, "job", "list", f"--address=http://{dash}"], env={**env, "RAY_AUTH_MODE": "disabled"},
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0
    assert "token" in (denied.stdout + denied.stderr).lower()
    allowed = subprocess.run([ray_cli, "job", "list", f"--address=http://{dash}"], env={**env, "RAY_AUTH_MODE": "token"},
                             capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0, allowed.stderr[-2000:]


@pytest.mark.ray
@pytest.mark.slow
def test_the_jobs_state_api_finds_its_own_ray_while_another_ray_runs_on_the_host(ray_local, tmp_path) -> None:
    """Ray Train's placement-group cleaner asks the State API, from inside the job, whether its
    controller is alive. With a second Ray instance on the machine (another sprout, CI), a job
    process left to find the API itself fails with "Found multiple active Ray instances" and the
    cleaner gives up (ASHA-stopped trials then leak their CPUs): the address is handed to the job."""
    import ray

    other_tmp = tempfile.mkdtemp(prefix="ray2-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    other = subprocess.Popen(
        [PY, "-c", "import ray, sys, time; ray.init(address='local', include_dashboard=False, num_cpus=0, "
                   f"_temp_dir={other_tmp!r}); print('up', flush=True); time.sleep(600)"],
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert other.stdout.readline().strip() == "up"

        @ray.remote(num_cpus=0)
        def controller_alive_query() -> int:
            from ray.util.state import list_actors

            return len(list_actors(limit=1000))

        assert ray.get(controller_alive_query.remote(), timeout=120) >= 0
    finally:
        os.killpg(other.pid, signal.SIGTERM)
        other.wait(timeout=60)
        _reap_group(other.pid)
        shutil.rmtree(other_tmp, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
def test_final_model_that_cannot_be_logged_fails_the_run_and_keeps_its_checkpoints(
        ray_local, tmp_path, session_dir, capsys) -> None:
    """Training finishes, then logging the selected model fails (a real fault: a regular file
    stands where the experiment's ``models/`` artifact directory (MLflow 3's logged models) must
    go, placed while rank 0 is held at epoch 2): exit 1 with one line saying the run trained, the
    run FAILED (never left RUNNING) with the error tag, and the checkpoints still there and loadable."""
    from orchestrator.cli import main
    from trainables.checkpoint import load_checkpoint

    name = f"unlogged-{uuid.uuid4().hex[:6]}"
    rr = tmp_path / "rr"
    debug = session_dir / "debug" / name
    debug.mkdir(parents=True)
    (debug / "pause-at-epoch").write_text("1")
    experiment = f"test-{name}"  # its own artifact location: the blocker must not reach other tests
    sets = [f"storage.path={rr}", f"experiment={experiment}", "method=natural", "train.epochs=2",
            "train.val_pgd_steps=0", "eval.attacks=[]", "train.checkpoint_keep=10"]
    box: dict = {}
    th = threading.Thread(target=lambda: box.setdefault("code", main(
        ["train", str(DIGITS), "--name", name, *[a for x in sets for a in ("--set", x)]])), daemon=True)
    th.start()
    try:
        deadline = time.time() + HANG_GUARD_S
        while not (debug / "paused-at-epoch-1").exists():
            if not (th.is_alive() and time.time() < deadline):
                pytest.fail(f"the run never reached epoch 2: {box}")
            time.sleep(0.1)
        c = tracking.client()
        run_id = _runs_with_key(c, experiment, name)[0].info.run_id
        location = Path(c.get_experiment_by_name(experiment).artifact_location.removeprefix("file://"))
        assert location.is_dir() and not (location / "models").exists()
        (location / "models").write_text("not a directory")
    finally:
        (debug / "resume").write_text("")
    th.join(timeout=HANG_GUARD_S)
    assert not th.is_alive() and box.get("code") == 1, box
    lines = [ln for ln in _nonblank(capsys.readouterr().err) if ln.startswith("sprout:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"sprout: train failed: RuntimeError: training run '{name}' trained, but its final model could not be "
        "logged: "), lines
    run = c.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "model" in run.data.tags[tracking.ERROR_TAG]
    assert _steps(c, run_id, "train/loss") == [1, 2]  # it did train: the failure came after fit()
    ckpts = sorted(d for d in (rr / name).glob("checkpoint_*") if d.is_dir())
    assert [load_checkpoint(d)["epoch"] for d in ckpts] == [0, 1]


# ---------------------------------------------------------- real `sprout train` processes


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_ctrl_c_and_sigkill_stop_sprout_train_and_each_rerun_resumes(tmp_path) -> None:
    """SIGTERM to the driver (``kill PID``, preemption), then Ctrl-C (SIGINT to the whole process
    group, as a terminal sends it) to the resumed run, then SIGKILL of the whole process group
    (``kill -9``, the OOM killer: no handler runs) to the next; the same command then finishes."""
    import ray

    ray.shutdown()
    epochs, name, exp = 5, "graceful", "test-reliability-proc"
    store = tmp_path / "mlflow.db"
    debug = tmp_path / "debug"
    run_dir = tmp_path / "rr" / name
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    env = _train_env(f"sqlite:///{store}", debug, SPROUT_TEST_SECRET=secret)
    # digits epochs take a fraction of a second: the drill hook below, not slow data, keeps each signal mid-run
    cmd = _train_cmd(name, [f"storage.path={tmp_path / 'rr'}", f"experiment={exp}", f"train.epochs={epochs}",
                            "eval.attacks=[]", "train.val_pgd_steps=2", "train.checkpoint_keep=10"])
    c = tracking.client(f"sqlite:///{store}")
    logged, pids = 0, {}
    (debug / name).mkdir(parents=True)
    for sig, to_group in ((signal.SIGTERM, False), (signal.SIGINT, True)):
        # rank 0 waits at the start of the next epoch (the drill hook), so the signal always lands
        # mid-run: the run cannot race to its last epoch before it
        (debug / name / "pause-at-epoch").write_text(str(logged + 1))
        err_path = tmp_path / f"{sig.name}.err"
        with err_path.open("w") as err:
            proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True, preexec_fn=_sigint_as_in_a_terminal)
            try:
                run_id = _wait_for_epochs(proc, c, exp, name, logged + 1, run_dir)  # one more epoch than before
                (os.killpg if to_group else os.kill)(proc.pid, sig)
                code = proc.wait(timeout=HANG_GUARD_S)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=60)
                _reap_group(proc.pid)
        stderr = err_path.read_text()
        assert code == 130, (sig.name, stderr[-3000:])
        assert "re-run the same command to resume" in stderr
        assert c.get_run(run_id).info.status == "KILLED"
        before = _steps(c, run_id, "train/loss")
        assert before == list(range(1, logged + 2)), (sig.name, before)  # exactly one more epoch
        assert (debug / name / f"paused-at-epoch-{logged + 1}").exists()
        logged = len(before)
        pids[sig.name] = {e: _record_pid(debug / name, e) for e in range(_latest_ckpt_epoch(run_dir))}
    assert len(_runs_with_key(c, exp, name)) == 1
    # the Ctrl-C'd run resumed from the SIGTERM'd run's checkpoint: the epochs before it kept their process
    resumed_at = min(len(pids["SIGTERM"]), len(pids["SIGINT"]))
    assert resumed_at >= 1 and all(pids["SIGINT"][e] == pids["SIGTERM"][e] for e in range(resumed_at))

    # SIGKILL of the whole process group once one more epoch is checkpointed
    (debug / name / "pause-at-epoch").write_text(str(logged + 1))
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for_epochs(proc, c, exp, name, logged + 1, run_dir)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        _reap_group(proc.pid)
    before = _steps(c, run_id, "train/loss")
    assert before == list(range(1, logged + 2)), before
    assert c.get_run(run_id).info.status == "RUNNING"  # a SIGKILL leaves no chance to mark it
    assert (debug / name / f"paused-at-epoch-{logged + 1}").exists()
    pids["SIGKILL"] = {e: _record_pid(debug / name, e) for e in range(_latest_ckpt_epoch(run_dir))}
    assert len(pids["SIGKILL"]) == logged + 1 < epochs
    assert all(pids["SIGKILL"][e] == pid for e, pid in pids["SIGINT"].items())

    (debug / name / "pause-at-epoch").unlink()
    rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "(resumed)" in rerun.stdout
    runs = _runs_with_key(c, exp, name)
    assert len(runs) == 1 and runs[0].info.run_id == run_id
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in PER_EPOCH:
        assert _steps(c, run_id, key) == list(range(1, epochs + 1)), key  # none lost, none twice
    last = _latest_ckpt_epoch(run_dir)
    assert last == epochs
    # the epochs checkpointed before the SIGKILL were not trained again; the later ones ran in the re-run
    for e, pid in pids["SIGKILL"].items():
        assert _record_pid(debug / name, e) == pid, f"epoch {e + 1} was trained again after the SIGKILL"
    earlier = {pid for leg in pids.values() for pid in leg.values()}
    assert all(_record_pid(debug / name, e) not in earlier for e in range(len(pids["SIGKILL"]), epochs))
    _assert_secret_never_logged(store, tmp_path / "mlartifacts", run, secret)


def _children(c, experiment: str, parent_key: str) -> tuple[object, list]:
    parents = _runs_with_key(c, experiment, parent_key)
    if not parents:
        return None, []
    exp = c.get_experiment_by_name(experiment)
    kids = c.search_runs([exp.experiment_id], max_results=100,
                         filter_string=f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    return parents[0], kids


def _wait_until(proc: subprocess.Popen, cond, what: str, err_path: Path | None = None) -> None:
    """Poll ``cond()`` until it holds; fail if ``proc`` exits first (with its stderr's end) or after the hang guard."""
    deadline = time.time() + HANG_GUARD_S
    while not cond():
        assert proc.poll() is None, f"sprout exited ({proc.returncode}) before {what}" + (
            f": {err_path.read_text()[-2000:]}" if err_path is not None else "")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.25)


def _stop_with(sig: signal.Signals, to_group: bool, cmd: list[str], env: dict, cwd: Path, err_path: Path,
               ready) -> int:
    """Start ``cmd``, wait until ``ready()`` holds, send ``sig``; the exit code."""
    with err_path.open("w") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True,
                                preexec_fn=_sigint_as_in_a_terminal)
        try:
            _wait_until(proc, ready, sig.name, err_path)
            (os.killpg if to_group else os.kill)(proc.pid, sig)
            return proc.wait(timeout=HANG_GUARD_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
            _reap_group(proc.pid)


# ------------------------------------------------- simulated cluster (shuts Ray down)


@pytest.fixture
def own_ray(monkeypatch, mlflow_uri, session_dir):
    """No shared in-process Ray during the test; the one that ran before is back after it."""
    import ray

    was = ray.is_initialized()
    ray.shutdown()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("SPROUT_DEBUG_DIR", str(session_dir / "debug"))
    yield
    ray.shutdown()
    if was:
        from orchestrator.session import ensure_ray

        ensure_ray()


@pytest.mark.ray
@pytest.mark.slow
def test_lost_node_without_replacement_fails_clearly_after_the_configured_wait(
        tmp_path, session_dir, own_ray) -> None:
    """The only worker node dies and none joins: a clear failure, not Ray's endless retry."""
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.runner import run_training
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 4},
    })
    worker = cluster.add_node(num_cpus=1)
    name = f"node-gone-{uuid.uuid4().hex[:6]}"
    try:
        ray.init(address=cluster.address)
        cfg = digits_cfg(tmp_path, "experiment=test-reliability", "train.epochs=8", "train.max_failures=3",
                         "scaling.worker_start_timeout_s=5", "scaling.worker_start_retries=0", *SLOW_DATA)
        box: dict = {}

        def target() -> None:
            try:
                box["out"] = run_training(cfg, name)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                box["error"] = e

        th = threading.Thread(target=target, daemon=True)
        th.start()
        debug = session_dir / "debug" / name
        deadline = time.time() + HANG_GUARD_S
        while not (debug / "worker-0-epoch-1.json").exists():
            if not (th.is_alive() and time.time() < deadline):
                pytest.fail(f"training never reached epoch 2: {box}")
            time.sleep(0.2)
        cluster.remove_node(worker, allow_graceful=False)  # and no node ever replaces it
        th.join(timeout=HANG_GUARD_S)
        assert not th.is_alive(), "the run waited for workers forever"
        err = box.get("error")
        assert isinstance(err, RuntimeError), box
        msg = str(err)
        assert "1 worker(s)" in msg and "CPU: 0.5" in msg, msg  # what was requested
        assert "within 5 s" in msg and "available now: {'CPU': 0.0" in msg, msg  # after the configured wait
        assert "cluster total: {'CPU': 0.0" in msg, msg  # the worker node is gone, not only busy
        assert "\n" not in msg
        c = tracking.client()
        runs = _runs_with_key(c, cfg.experiment, name)
        assert len(runs) == 1 and c.get_run(runs[0].info.run_id).info.status == "FAILED"
        assert c.get_run(runs[0].info.run_id).data.tags.get(tracking.ERROR_TAG)
    finally:
        ray.shutdown()
        cluster.shutdown()
