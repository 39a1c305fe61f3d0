"""MLflow in production mode (issue 12): a real ``mlflow server`` on a real PostgreSQL, artifacts
proxied to the SeaweedFS bucket (``--artifacts-destination s3://...``), MLflow's basic-auth app on.

``sprout`` talks to it unchanged, with the standard ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``
variables; the ``sprout`` process gets no bucket credentials at all (proxied artifacts).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from orchestrator import tracking
from tests.conftest import DIGITS
from tests.orchestrator.conftest import BUCKET
from tests.orchestrator.test_console import NOISE, _log_path

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


def test_without_a_terminal_sprout_train_prints_a_few_lines_and_logs_the_rest(production_run, alice, as_alice) -> None:
    """What a user sees from `sprout train` (issue 15) with its output captured (no terminal, no
    --verbose): a few lines of its own, one per epoch, the run's link on this server and the log
    file's path; Ray's and the workers' own lines are in that log file, not on the console."""
    out, name = production_run["out"], production_run["name"]
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) <= 15, lines
    assert [line for line in lines if " epoch " in line] == [
        line for line in lines if re.match(rf"{name}: epoch [12]/2  loss \d\.\d{{4}}  val clean \d\.\d{{3}}  pgd", line)]
    assert sum(" epoch 1/2 " in line for line in lines) == 1 and sum(" epoch 2/2 " in line for line in lines) == 1
    assert not [line for line in lines if any(n in line for n in NOISE)], lines
    run = _run(as_alice, production_run)
    link = f"MLflow run: {alice.uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert link in lines, lines
    log = _log_path(out.stderr)
    assert log.is_file() and log.is_relative_to(production_run["tmp"] / "ray_results" / name)
    text = log.read_text()
    assert "RayTrainWorker" in text and "TrainingReport" in text  # the workers' own lines are in the log


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


def test_the_launchers_mlflow_command_runs_on_postgresql_and_the_bucket_named_in_its_env_file(
        mlflow_server, seaweed, tmp_path, monkeypatch) -> None:
    """`cluster/aws.yaml`'s (= `gcp.yaml`'s) own head command, run as the head runs it, with the
    production stores named in ``~/.sprout/mlflow.env``: runs in PostgreSQL, users in a second
    database, artifacts proxied to the bucket, login required; nothing on the head's disk."""
    import urllib.error
    import urllib.request

    import psycopg2
    import yaml

    from tests.services import BIN, MLFLOW_JOB_PROCESSES, free_port, group_cmdlines

    _, pg = mlflow_server
    cmds = []
    for launcher in ("aws.yaml", "gcp.yaml"):
        cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster" / launcher).read_text())
        cmds.append(next(c for c in cfg["head_start_ray_commands"] if "mlflow server" in c))
    assert cmds[0] == cmds[1], "both launchers start the same server"
    port = free_port()  # the head's 0.0.0.0:5000, moved to a free loopback port for the test
    cmd = cmds[0].replace("--host 0.0.0.0 --port 5000", f"--host 127.0.0.1 --port {port}")
    cmd = cmd.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    assert cmd.count(str(port)) == 2, cmd
    suffix = uuid.uuid4().hex[:8]
    runs_db, users_db, prefix = f"launcher_{suffix}", f"launcher_auth_{suffix}", f"launcher-{suffix}"
    conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user, password=pg.password, dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        for db in (runs_db, users_db):
            cur.execute(f"CREATE DATABASE {db}")
    conn.close()
    home = tmp_path / "home"
    (home / ".sprout").mkdir(parents=True)
    admin, admin_pw = "ops", f"ops-{uuid.uuid4().hex}"
    db = f"postgresql+psycopg2://{pg.user}@127.0.0.1:{pg.port}"  # no password in a URI: PGPASSWORD
    (home / ".sprout" / "mlflow.env").write_text(
        f"MLFLOW_TRACKING_USERNAME={admin}\nMLFLOW_TRACKING_PASSWORD={admin_pw}\nPGPASSWORD={pg.password}\n"
        f"SPROUT_MLFLOW_BACKEND_STORE_URI={db}/{runs_db}\nSPROUT_MLFLOW_AUTH_DATABASE_URI={db}/{users_db}\n"
        f"SPROUT_MLFLOW_ARTIFACTS_DESTINATION=s3://{BUCKET}/{prefix}\n")
    # the head's environment: its PATH and its instance profile's bucket access (here: the endpoint's keys)
    env = {"HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}", **seaweed.env()}
    head = subprocess.Popen(["bash", "-c", cmd], env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        assert head.wait(timeout=60) == 0  # the command returns; the server runs on under nohup
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:  # noqa: S310 - loopback
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            log = (home / "mlflow" / "server.log").read_text()
            try:
                os.killpg(head.pid, 0)  # the server is still up (it runs on in the command's group)
            except ProcessLookupError:
                pytest.fail(f"the launcher's mlflow server exited:\n{log[-3000:]}")
            if time.time() > deadline:  # a hang guard, not a timing claim
                pytest.fail(log[-3000:])
            time.sleep(0.5)
        # MLflow 3's job executor is off (the command sets it): no job runner or consumer in the group
        time.sleep(1)
        jobs = [c for c in group_cmdlines(head.pid) if any(j in c for j in MLFLOW_JOB_PROCESSES)]
        assert not jobs, jobs
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(base + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)  # noqa: S310
        assert anonymous.value.code == 401
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(k)  # the client reaches the bucket only through the server
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_pw)
        c = tracking.client(base)
        exp_id = c.create_experiment(f"launcher-{suffix}")
        run_id = c.create_run(exp_id).info.run_id
        c.log_metric(run_id, "val/clean_acc", 0.875, step=3)
        note = tmp_path / "note.txt"
        note.write_text(f"written through the head's server {suffix}")
        c.log_artifact(run_id, str(note))
        c.set_terminated(run_id)
        with psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user, password=pg.password,
                              dbname=runs_db) as runs, runs.cursor() as cur:
            cur.execute("SELECT key, value, step FROM metrics WHERE run_uuid = %s", (run_id,))
            assert cur.fetchall() == [("val/clean_acc", 0.875, 3)]
        with psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user, password=pg.password,
                              dbname=users_db) as users, users.cursor() as cur:
            cur.execute("SELECT username FROM users")
            assert [r[0] for r in cur.fetchall()] == [admin]
        key = f"{prefix}/{exp_id}/{run_id}/artifacts/note.txt"
        assert key in seaweed.keys(BUCKET, f"{prefix}/")
        assert seaweed.client().get_object(Bucket=BUCKET, Key=key)["Body"].read() == note.read_bytes()
        left = sorted(p.name for p in (home / "mlflow").rglob("*") if p.is_file())
        assert left == ["basic_auth.ini", "flask_secret", "server.log"], left  # no SQLite store, no local artifacts
        assert (home / "mlflow" / "flask_secret").stat().st_mode & 0o077 == 0
        assert admin_pw not in (home / "mlflow" / "basic_auth.ini").read_text()
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)
            time.sleep(2)
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
