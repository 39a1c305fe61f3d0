"""Multi-node behaviour on a simulated cluster, and a real ``ray job submit`` (issue 3).

Each test starts its own cluster: the ``own_ray`` fixture shuts the shared in-process Ray down
first and starts it again afterwards if it was running, so the order of tests does not matter.
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
from pathlib import Path

import pytest

from orchestrator import tracking
from tests.conftest import ROOT, digits_cfg
from tests.orchestrator.test_reliability import (  # noqa: F401 - own_ray is a fixture
    _alive,
    _latest_ckpt_epoch,
    _listening,
    _stop_processes,
    own_ray,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("own_ray")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_node_removed_mid_run_and_replaced_run_finishes(tmp_path, session_dir) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.runner import run_training

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
        old_node = json.loads((debug / "worker-0-epoch-0.json").read_text())["node_id"]
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
        # The dead node's worker may outlive its raylet, paused: end it (it is this test's own
        # process), never release it, or it would go on training and writing records.
        if _alive(first_pid):
            os.kill(first_pid, signal.SIGKILL)
        th.join(timeout=600)
        assert not th.is_alive()
        out = box["out"]
        c = tracking.client()
        steps = sorted(m.step for m in c.get_metric_history(out.run_id, "train/loss"))
        assert steps == [1, 2, 3, 4]
        recs = {e: json.loads((debug / f"worker-0-epoch-{e}.json").read_text()) for e in range(4)}
        # epoch 1 (checkpointed before the loss) was not trained again; the new worker, on the new
        # node, resumed from it and trained epochs 2-4 (epoch 2 again: the old worker never finished it)
        assert recs[0]["pid"] == first_pid and recs[0]["node_id"] == old_node
        new_pids = {recs[e]["pid"] for e in (1, 2, 3)}
        assert len(new_pids) == 1 and first_pid not in new_pids, recs
        assert {recs[e]["node_id"] for e in (1, 2, 3)} == {recs[1]["node_id"]} != {old_node}
        assert not (debug / "resume").exists()
    finally:
        ray.shutdown()
        cluster.shutdown()


def _head_processes(pgid: int, temp_dir: str) -> list[int]:
    """This test's head: the processes of ``ray start``'s process group or naming its --temp-dir."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or not _alive(int(p.name)):
            continue
        try:
            pg = int((p / "stat").read_text().rsplit(")", 1)[1].split()[2])
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if pg == pgid or temp_dir in cmd:
            out.append(int(p.name))
    return out


@pytest.mark.skipif(shutil.which("ray", path=str(Path(sys.executable).parent)) is None, reason="ray CLI missing")
def test_ray_job_submit_runs_sprout_train_and_logs_to_mlflow(tmp_path, session_dir) -> None:
    """A real head (127.0.0.1, token auth) and real submissions of the laptop command through
    cluster/submit.sh: the first job is stopped with `ray job stop` mid-run (sprout's graceful
    stop must land between its SIGTERM and the SIGKILL after cluster/runtime_env.yaml's
    RAY_JOB_STOP_WAIT_TIME_S: run KILLED, resume message); the same command submitted again
    resumes into the same MLflow run and succeeds."""
    bindir = Path(sys.executable).parent
    gcs, dash = _free_port(), _free_port()
    store = tmp_path / "mlflow.db"
    debug = tmp_path / "debug"
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{bindir}:{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=f"sqlite:///{store}", RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    env.pop("SPROUT_GIT_SHA", None)  # an in-process Ray fixture of this session may have set it
    # The job's processes inherit the head's environment: with no usable git there, the run's
    # git_sha can only come from what cluster/submit.sh put in the job's runtime env. The
    # drill hook (SPROUT_DEBUG_DIR) holds the first job at epoch 3, so `ray job stop` lands mid-run.
    head_env = dict(env, GIT_DIR=str(tmp_path / "no-git-here"), SPROUT_DEBUG_DIR=str(debug))
    name, epochs = "job-digits", 4
    (debug / name).mkdir(parents=True)
    (debug / name / "pause-at-epoch").write_text("2")
    # Our own --temp-dir (short: Ray's socket paths must fit 107 bytes) and process group: the head
    # is stopped by its own processes, never by `ray stop`, which ends every Ray on the host.
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    starter = subprocess.Popen(
        [str(bindir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats",
         f"--temp-dir={temp_dir}",
         # free ports, not the fixed defaults (52365, ...) another Ray on this host may hold: without its
         # agent the head answers every submission "No available agent"
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}"],
        env=head_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        _, err = starter.communicate(timeout=180)
        assert starter.returncode == 0, err[-2000:]
        head_pids = _head_processes(starter.pid, temp_dir)
        assert head_pids
        # the dashboard / job API listens on loopback only (the real sockets of the head's processes)
        socks = _listening(head_pids)
        assert {ip for ip, port in socks if port == dash} == {"127.0.0.1"}, sorted(socks)
        entry = (f"sprout train configs/digits.yaml --name {name} --set train.epochs={epochs} "
                 f"--set storage.path={tmp_path / 'rr'} --set experiment=job-submit --set eval.attacks=[] "
                 "--set train.val_pgd_steps=2 --set train.checkpoint_keep=10").split()
        addr = f"--address=http://127.0.0.1:{dash}"
        job = [str(bindir / "ray"), "job"]

        def submit(submission_id: str, *flags: str) -> subprocess.CompletedProcess:
            # cluster/submit.sh: `ray job submit` with cluster/runtime_env.yaml plus this checkout's
            # commit as SPROUT_GIT_SHA (the uploaded working dir has no .git)
            for _ in range(12):  # a fresh head answers "No available agent" until its dashboard agent is up
                sub = subprocess.run([str(ROOT / "cluster" / "submit.sh"), addr, *flags, "--submission-id",
                                      submission_id, "--", *entry], env=env, capture_output=True, text=True,
                                     timeout=600, cwd=ROOT)
                if "No available agent" not in sub.stdout + sub.stderr:
                    return sub
                time.sleep(5)
            return sub

        sub = submit("sprout-job-stop", "--no-wait")
        assert sub.returncode == 0, (sub.stdout[-3000:], sub.stderr[-3000:])
        deadline = time.time() + 600
        while not (debug / name / "paused-at-epoch-2").exists():
            if not (time.time() < deadline):
                pytest.fail("the submitted run never reached epoch 3")
            time.sleep(0.5)
        first_pid = json.loads((debug / name / "worker-0-epoch-0.json").read_text())["pid"]
        stop = subprocess.run([*job, "stop", addr, "sprout-job-stop"], env=env, capture_output=True, text=True,
                              timeout=300)
        assert stop.returncode == 0, stop.stderr[-3000:]
        status = subprocess.run([*job, "status", addr, "sprout-job-stop"], env=env, capture_output=True, text=True,
                                timeout=60)
        assert "stopped" in (status.stdout + status.stderr).lower()
        logs = subprocess.run([*job, "logs", addr, "sprout-job-stop"], env=env, capture_output=True, text=True,
                              timeout=60)
        assert "re-run the same command to resume" in logs.stdout + logs.stderr
        c = tracking.client(f"sqlite:///{store}")
        exp = c.get_experiment_by_name("job-submit")
        runs = c.search_runs([exp.experiment_id])
        assert len(runs) == 1 and runs[0].data.tags["sprout.run_key"] == name and runs[0].info.status == "KILLED"
        run_id = runs[0].info.run_id
        assert sorted(m.step for m in c.get_metric_history(run_id, "train/loss")) == [1, 2]
        resume_from = _latest_ckpt_epoch(tmp_path / "rr" / name)
        assert resume_from == 2

        again = submit("sprout-job-resume")
        assert again.returncode == 0, (again.stdout[-3000:], again.stderr[-3000:])
        assert "(resumed)" in again.stdout
        status = subprocess.run([*job, "status", addr, "sprout-job-resume"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert "succeeded" in (status.stdout + status.stderr).lower()
        runs = c.search_runs([exp.experiment_id])
        assert len(runs) == 1 and runs[0].info.run_id == run_id and runs[0].info.status == "FINISHED"
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        assert runs[0].data.tags["git_sha"] == head.stdout.strip()  # the submitting checkout's commit
        for key in ("train/loss", "val/clean_acc"):
            assert sorted(m.step for m in c.get_metric_history(run_id, key)) == list(range(1, epochs + 1)), key
        # resumed, not retrained: the epochs before the checkpoint kept the first job's worker
        pids = [json.loads((debug / name / f"worker-0-epoch-{e}.json").read_text())["pid"] for e in range(epochs)]
        assert pids[:resume_from] == [first_pid] * resume_from
        assert first_pid not in pids[resume_from:], pids
    finally:
        if starter.poll() is None:
            starter.kill()
        _stop_processes(_head_processes(starter.pid, temp_dir))
        assert not _head_processes(starter.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)

