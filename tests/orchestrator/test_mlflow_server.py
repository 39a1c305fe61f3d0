"""MLflow in production mode (issue 12): a real ``mlflow server`` on a real PostgreSQL, artifacts
proxied to the SeaweedFS bucket (``--artifacts-destination s3://...``), MLflow's basic-auth app on.

``sprout`` talks to it unchanged, with the standard ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``
variables; the ``sprout`` process gets no bucket credentials at all (proxied artifacts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from orchestrator import tracking
from tests.conftest import DIGITS
from tests.orchestrator.conftest import BUCKET

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PY = sys.executable
HANG_GUARD_S = 600
USER, PASSWORD = "alice", f"alice-{uuid.uuid4().hex}"


def _env(server, tmp: Path, **creds: str) -> dict[str, str]:
    """The environment of a cluster user: tracking URI and MLflow credentials, no AWS variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.pop("RAY_ADDRESS", None)
    env.update(MLFLOW_TRACKING_URI=server.uri, SPROUT_DEBUG_DIR=str(tmp / "debug"), **creds)
    return env


def _train(name: str, sets: list[str]) -> list[str]:
    return [PY, "-m", "orchestrator", "train", str(DIGITS), "--name", name, *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(scope="module")
def alice(mlflow_server):
    server, _ = mlflow_server
    server.create_user(USER, PASSWORD)
    return server


@pytest.fixture(scope="module")
def production_run(alice, seaweed, tmp_path_factory):
    import ray

    ray.shutdown()  # one Ray instance at a time: the subprocess starts its own
    tmp = tmp_path_factory.mktemp("prod")
    exp, name = f"test-prod-{uuid.uuid4().hex[:6]}", "prod-sprout"
    cmd = _train(name, [f"storage.path={tmp / 'ray_results'}", f"experiment={exp}", "train.epochs=2",
                        "train.val_pgd_steps=2", "eval.attacks=[pgd20]", "eval.n_examples=40",
                        "train.checkpoint_metric=val/clean_acc"])
    env = _env(alice, tmp, MLFLOW_TRACKING_USERNAME=USER, MLFLOW_TRACKING_PASSWORD=PASSWORD)
    out = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=HANG_GUARD_S)
    return {"out": out, "exp": exp, "name": name, "tmp": tmp, "cmd": cmd}


@pytest.fixture
def as_alice(alice, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", alice.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)  # what this process reads, it reads through the server
    return tracking.client(alice.uri)


def _run(c, r):
    exp = c.get_experiment_by_name(r["exp"])
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.RUN_KEY}` = '{r['name']}'")
    assert len(runs) == 1
    return runs[0]


def _artifacts(c, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for f in c.list_artifacts(run_id, path):
        out += _artifacts(c, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_sprout_train_logs_params_metrics_plots_and_model_to_the_production_server(production_run, as_alice,
                                                                                   seaweed) -> None:
    out = production_run["out"]
    assert out.returncode == 0, out.stderr[-3000:]
    c = as_alice
    run = _run(c, production_run)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["method"] == "sprout"
    assert run.data.tags["sprout_kind"] == "train"
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "val/clean_acc")) == [1, 2]
    assert 0.0 <= run.data.metrics["test/clean_acc"] <= 1.0
    files = _artifacts(c, run.info.run_id)
    assert "config.yaml" in files and any(f.startswith("plots/") and f.endswith(".png") for f in files), files
    # the artifacts are objects in the bucket, written by the server (the sprout process had no AWS keys)
    keys = seaweed.keys(BUCKET, "mlartifacts/")
    exp_id = run.info.experiment_id
    assert f"mlartifacts/{exp_id}/{run.info.run_id}/artifacts/config.yaml" in keys
    assert any(k.startswith(f"mlartifacts/{exp_id}/{run.info.run_id}/artifacts/plots/") for k in keys)
    assert any(k.startswith(f"mlartifacts/{exp_id}/") and k.endswith("MLmodel") for k in keys)
    # the credentials are never logged: not in params, tags, artifacts or what sprout printed
    assert all(PASSWORD not in v for v in {**run.data.params, **run.data.tags}.values())
    assert PASSWORD not in out.stdout + out.stderr
    s3 = seaweed.client()
    for k in keys:
        if f"/{run.info.run_id}/" in k:
            assert PASSWORD.encode() not in s3.get_object(Bucket=BUCKET, Key=k)["Body"].read(), k


def test_the_logged_model_loads_through_the_server_and_reproduces_val_accuracy(production_run, as_alice) -> None:
    """The documented loader, ``mlflow.pytorch.load_model("runs:/<id>/model")``, through the
    authenticated server (artifacts proxied from S3), recomputes the logged ``val/clean_acc``."""
    import mlflow
    import mlflow.pytorch

    from orchestrator.config import from_dict
    from orchestrator.worker import datasets
    from trainables.checkpoint import load_checkpoint
    from trainables.loop import make_loader

    assert production_run["out"].returncode == 0, production_run["out"].stderr[-3000:]
    c = as_alice
    run = _run(c, production_run)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    try:
        model.eval()
    except NotImplementedError:  # an exported (pt2) module is in inference form already
        pass
    epoch = load_checkpoint(run.data.tags["sprout.selected_checkpoint"])["epoch"] + 1
    logged = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "val/clean_acc")}[epoch]
    import yaml

    cfg = from_dict(yaml.safe_load(Path(c.download_artifacts(run.info.run_id, "config.yaml")).read_text()))
    val = datasets(cfg, ("val",))["val"]
    correct = n = 0
    with torch.no_grad():
        for x, y in make_loader(val, 256, seed=0, shuffle=False):
            correct += int((model(x).argmax(1) == y).sum())
            n += len(y)
    assert correct / n == pytest.approx(logged, abs=1e-9)


@pytest.mark.parametrize("creds", ["wrong-password", "none"])
def test_wrong_or_missing_mlflow_credentials_exit_2_with_one_line_and_start_nothing(alice, tmp_path, creds,
                                                                                    monkeypatch) -> None:
    bad = f"wrong-{uuid.uuid4().hex}"
    extra = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": bad} if creds == "wrong-password" else {}
    exp = f"test-prod-denied-{uuid.uuid4().hex[:6]}"
    out = subprocess.run(_train("denied", [f"storage.path={tmp_path / 'ray_results'}", f"experiment={exp}",
                                           "eval.attacks=[]"]),
                         env=_env(alice, tmp_path, **extra), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert "HTTP 401" in lines[0] and "MLFLOW_TRACKING_USERNAME" in lines[0] and alice.uri in lines[0], lines[0]
    assert bad not in out.stdout + out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # no ray_results, no debug records: nothing started
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", alice.admin_user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", alice.admin_password)
    assert tracking.client(alice.uri).get_experiment_by_name(exp) is None  # no experiment, no run on the server
