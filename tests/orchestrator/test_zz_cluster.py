"""Multi-node behaviour on a simulated cluster, and a real ``ray job submit`` (issue 3).

Named ``test_zz_*`` so it runs after the tests that share the in-process Ray instance:
it shuts that instance down to start its own clusters.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator import tracking
from tests.conftest import ROOT, digits_cfg
from tests.orchestrator.test_reliability import SLOW_DATA, _latest_ckpt_epoch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_node_removed_mid_run_and_replaced_run_finishes(tmp_path, mlflow_uri, session_dir) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.runner import run_training

    ray.shutdown()
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    os.environ["SPROUT_DEBUG_DIR"] = str(session_dir / "debug")
    # Fast failure detection (default: ~30 s of missed heartbeats) so the loss lands mid-run.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_failure_threshold": 4},
    })
    worker = cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cfg = digits_cfg(tmp_path, "experiment=test-cluster", "train.epochs=4", "train.max_failures=3")
        debug = session_dir / "debug" / "node-loss"
        debug.mkdir(parents=True, exist_ok=True)
        (debug / "pause-at-epoch").write_text("1")  # hold rank 0 at epoch 2 while the node dies
        box: dict = {}
        th = threading.Thread(target=lambda: box.setdefault("out", run_training(cfg, "node-loss")), daemon=True)
        th.start()
        deadline = time.time() + 300
        while not (debug / "paused-at-epoch-1").exists():
            if not (th.is_alive() and time.time() < deadline):
                pytest.fail("training never reached epoch 2")
            time.sleep(0.2)
        first_pid = int((debug / "paused-at-epoch-1").read_text())
        # Rank 0 reported epoch 1 before pausing; the controller registers that checkpoint
        # when it next polls. Kill the node only after, or the run rightly restarts from scratch.
        while _latest_ckpt_epoch(tmp_path / "ray_results" / "node-loss") < 1:
            if not (th.is_alive() and time.time() < deadline):
                pytest.fail("the epoch-1 checkpoint was never registered")
            time.sleep(0.2)
        cluster.remove_node(worker, allow_graceful=False)  # the node holding the only worker dies
        cluster.add_node(num_cpus=1)  # a fresh node joins (must happen on the main thread)
        while not any(json.loads(p.read_text())["pid"] != first_pid for p in debug.glob("worker-0-epoch-*.json")):
            if not (th.is_alive() and time.time() < deadline):
                pytest.fail("no new worker started after the node loss")
            time.sleep(0.2)
        (debug / "resume").write_text("")  # release the orphaned process of the dead node
        th.join(timeout=600)
        assert not th.is_alive()
        out = box["out"]
        c = tracking.client()
        steps = sorted(m.step for m in c.get_metric_history(out.run_id, "train/loss"))
        assert steps == [1, 2, 3, 4]
        pids = {json.loads(p.read_text())["pid"] for p in debug.glob("worker-0-epoch-*.json")}
        assert len(pids) >= 2 and first_pid in pids, "the run did not move to a new worker process"
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.skipif(shutil.which("ray", path=str(Path(sys.executable).parent)) is None, reason="ray CLI missing")
def test_ray_job_submit_runs_sprout_train_and_logs_to_mlflow(tmp_path, session_dir) -> None:
    """A real head (127.0.0.1, token auth), a real job submission of the laptop command."""
    import ray

    ray.shutdown()
    bindir = Path(sys.executable).parent
    gcs, dash = _free_port(), _free_port()
    store = tmp_path / "mlflow.db"
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{bindir}:{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=f"sqlite:///{store}", RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    head = subprocess.run(
        [str(bindir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert head.returncode == 0, head.stderr[-2000:]
    try:
        entry = (f"sprout train configs/digits.yaml --name job-digits --set train.epochs=2 "
                 f"--set storage.path={tmp_path / 'rr'} --set experiment=job-submit --set eval.attacks=[]")
        sub = subprocess.run(
            [str(bindir / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}",
             "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--working-dir", str(ROOT),
             "--submission-id", "sprout-job-test", "--", *entry.split()],
            env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
        )
        assert sub.returncode == 0, (sub.stdout[-3000:], sub.stderr[-3000:])
        status = subprocess.run(
            [str(bindir / "ray"), "job", "status", f"--address=http://127.0.0.1:{dash}", "sprout-job-test"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert "succeeded" in (status.stdout + status.stderr).lower()
        c = tracking.client(f"sqlite:///{store}")
        exp = c.get_experiment_by_name("job-submit")
        runs = c.search_runs([exp.experiment_id])
        assert len(runs) == 1 and runs[0].data.tags["sprout.run_key"] == "job-digits"
        assert sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "val/clean_acc")) == [1, 2]
        _ray_job_stop_is_graceful_and_resubmission_resumes(bindir, dash, env, tmp_path, c)
    finally:
        subprocess.run([str(bindir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def _ray_job_stop_is_graceful_and_resubmission_resumes(bindir: Path, dash: int, env: dict, tmp_path: Path, c) -> None:
    """`ray job stop` sends SIGTERM and, after cluster/runtime_env.yaml's RAY_JOB_STOP_WAIT_TIME_S,
    SIGKILL: sprout's graceful stop must land in between (run KILLED, resume message), and the
    same command submitted again resumes into the same MLflow run."""
    name, epochs = "job-stopped", 4
    sets = [f"storage.path={tmp_path / 'rr'}", "experiment=job-submit", "eval.attacks=[]", f"train.epochs={epochs}",
            "train.val_pgd_steps=2", "train.checkpoint_keep=10", *SLOW_DATA]
    entry = ["sprout", "train", "configs/digits.yaml", "--name", name, *[a for s in sets for a in ("--set", s)]]
    job = [str(bindir / "ray"), "job"]
    addr = f"--address=http://127.0.0.1:{dash}"
    submit = [*job, "submit", addr, "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"),
              "--working-dir", str(ROOT)]
    sub = subprocess.run([*submit, "--no-wait", "--submission-id", "sprout-job-stop", "--", *entry],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert sub.returncode == 0, sub.stderr[-3000:]
    deadline = time.time() + 600
    while _latest_ckpt_epoch(tmp_path / "rr" / name) < 1:
        if not (time.time() < deadline):
            pytest.fail("the submitted run checkpointed no epoch in time")
        time.sleep(0.5)
    stop = subprocess.run([*job, "stop", addr, "sprout-job-stop"], env=env, capture_output=True, text=True, timeout=300)
    assert stop.returncode == 0, stop.stderr[-3000:]
    status = subprocess.run([*job, "status", addr, "sprout-job-stop"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert "stopped" in (status.stdout + status.stderr).lower()
    logs = subprocess.run([*job, "logs", addr, "sprout-job-stop"], env=env, capture_output=True, text=True, timeout=60)
    assert "re-run the same command to resume" in logs.stdout + logs.stderr
    exp = c.get_experiment_by_name("job-submit")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`sprout.run_key` = '{name}'")
    assert len(runs) == 1 and runs[0].info.status == "KILLED"
    logged = sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "train/loss"))
    assert 1 <= len(logged) < epochs

    again = subprocess.run([*submit, "--submission-id", "sprout-job-resume", "--", *entry],
                           env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, (again.stdout[-3000:], again.stderr[-3000:])
    assert "(resumed)" in again.stdout
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`sprout.run_key` = '{name}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "train/loss")) == list(range(1, epochs + 1))
