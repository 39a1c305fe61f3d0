"""Run state on an S3-compatible object store (issue 12), against a real SeaweedFS on 127.0.0.1.

No mocks: ``weed mini`` serves S3 (``tests/services.py``); ``sprout`` runs as real processes
with the standard client variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). Resumes
are proven from the per-epoch worker records under ``$SPROUT_DEBUG_DIR`` (which process trained
which epoch), not from equal weights.
"""

from __future__ import annotations

import io
import json
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

from orchestrator import storage, tracking
from tests.conftest import DIGITS
from tests.orchestrator.conftest import BUCKET
from tests.orchestrator.test_reliability import (
    _children,
    _group_alive,
    _nonblank,
    _record_pid,
    _runs_with_key,
    _steps,
    _stop_with,
    _wait_until,
)
from tests.services import SeaweedS3, free_port

PY = sys.executable
HANG_GUARD_S = 600  # only a guard against hangs, never a performance assertion
CHEAP = ["eval.attacks=[]", "train.val_pgd_steps=2", "train.checkpoint_keep=10", "train.checkpoint_metric=val/clean_acc"]


# ----------------------------------------------------------------------------- helpers


def _env(s3: SeaweedS3, tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, **s3.env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
           "SPROUT_DEBUG_DIR": str(tmp / "debug"), **extra}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    return env


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def _train(name: str, sets: list[str]) -> list[str]:
    return [PY, "-m", "orchestrator", "train", str(DIGITS), "--name", name, *_sets(sets)]








def _pid(debug: Path, epoch: int) -> int:
    return json.loads((debug / f"worker-0-epoch-{epoch}.json").read_text())["pid"]


def _ckpt_epoch_on_s3(s3: SeaweedS3, key_prefix: str) -> int:
    """1-based epoch of the checkpoint Ray would resume from, read from its snapshot object (0: none)."""
    try:
        body = s3.client().get_object(Bucket=BUCKET, Key=f"{key_prefix}/checkpoint_manager_snapshot.json")["Body"]
        latest = json.loads(body.read()).get("latest_checkpoint_result") or {}
    except Exception:  # noqa: BLE001 - not written yet
        return 0
    return int((latest.get("metrics") or {}).get("epoch", 0))


def _checkpoint_keys(s3: SeaweedS3, key_prefix: str) -> list[str]:
    return sorted(k for k in s3.keys(BUCKET, key_prefix + "/") if k.endswith("/checkpoint.pt"))




def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole ``sprout`` process group (driver and its local Ray) and wait until it is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    deadline = time.time() + 60
    while _group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.3)


def _use(monkeypatch: pytest.MonkeyPatch, s3: SeaweedS3) -> None:
    """This process's S3 client variables point at ``s3`` for one test (restored after it)."""
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def no_inprocess_ray():
    """One Ray instance at a time: the ``sprout`` subprocesses start their own."""
    import ray

    ray.shutdown()


def _state(seed: int) -> dict:
    torch.manual_seed(seed)
    return {"model": {"w": torch.randn(64, 64), "b": torch.randn(64)}, "epoch": seed}


# ----------------------------------------------------------------------------- storage layer, no Ray


def test_checkpoint_on_s3_is_one_checksummed_object_that_loads_weights_only(seaweed, monkeypatch) -> None:
    _use(monkeypatch, seaweed)
    loc = f"s3://{BUCKET}/unit-{uuid.uuid4().hex[:8]}/checkpoint_000001"
    storage.save_checkpoint(loc, _state(1))
    prefix = loc.split(f"{BUCKET}/", 1)[1]
    assert seaweed.keys(BUCKET, prefix) == [f"{prefix}/checkpoint.pt"]  # one object, no temporaries
    got = storage.load_checkpoint(loc)
    assert got["epoch"] == 1 and torch.equal(got["model"]["w"], _state(1)["model"]["w"])
    assert storage.load_checkpoint(loc + "/checkpoint.pt")["epoch"] == 1  # the file itself works too

    raw = seaweed.client().get_object(Bucket=BUCKET, Key=f"{prefix}/checkpoint.pt")["Body"].read()
    assert raw.startswith(b"SPROUT-CHECKPOINT-1 sha256=")
    tampered = bytearray(raw)
    tampered[len(raw) // 2] ^= 0xFF
    for bad, why in ((bytes(tampered), "checksum"), (raw[: len(raw) // 3], "checksum")):
        seaweed.client().put_object(Bucket=BUCKET, Key=f"{prefix}/checkpoint.pt", Body=bad)
        with pytest.raises(storage.CheckpointError, match=why) as e:
            storage.load_checkpoint(loc)
        assert f"{loc}/checkpoint.pt" in str(e.value)  # names the object
    buf = io.BytesIO()
    torch.save({"model": {}, "evil": print}, buf)  # a pickled callable, with a valid checksum
    import hashlib

    payload = b"SPROUT-CHECKPOINT-1 sha256=" + hashlib.sha256(buf.getvalue()).hexdigest().encode() + b"\n"
    seaweed.client().put_object(Bucket=BUCKET, Key=f"{prefix}/checkpoint.pt", Body=payload + buf.getvalue())
    with pytest.raises(storage.CheckpointError, match="weights_only"):
        storage.load_checkpoint(loc)
    with pytest.raises(storage.CheckpointError, match="no checkpoint at"):
        storage.load_checkpoint(f"s3://{BUCKET}/{prefix}-missing")


_WRITER = """
import os, sys, torch
from orchestrator import storage
torch.manual_seed(0)
state = {"model": {"w": torch.randn(64 * 2**20 // 4)}, "epoch": 2}  # 64 MiB: a multipart upload
print("writing", flush=True)
storage.save_checkpoint(sys.argv[1], state)
print("done", flush=True)
"""


def test_a_writer_killed_mid_upload_leaves_the_previous_checkpoint_whole(seaweed, tmp_path, monkeypatch) -> None:
    """SIGKILL a process while its checkpoint upload is in flight (an S3 multipart upload is open):
    the object at that location is still the previous, complete checkpoint."""
    _use(monkeypatch, seaweed)
    loc = f"s3://{BUCKET}/killed-writer-{uuid.uuid4().hex[:8]}/checkpoint_000001"
    key = loc.split(f"{BUCKET}/", 1)[1] + "/checkpoint.pt"
    storage.save_checkpoint(loc, _state(1))
    s3 = seaweed.client()
    env = dict(os.environ, **seaweed.env(), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen([PY, "-c", _WRITER, loc], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        deadline = time.time() + 120

        def in_flight() -> bool:
            ups = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=key).get("Uploads", [])
            return any(u["Key"] == key for u in ups)

        while not in_flight():
            assert proc.poll() is None, "the writer finished before it could be killed mid-upload"
            if time.time() >= deadline:  # a hang guard, not a timing
                pytest.fail("no multipart upload was seen in flight")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    got = storage.load_checkpoint(loc)  # checksum verified: the whole previous checkpoint
    assert got["epoch"] == 1 and torch.equal(got["model"]["w"], _state(1)["model"]["w"])

    # and while a writer replaces it, a reader polling the object only ever sees a whole checkpoint
    from trainables.checkpoint import decode_checkpoint

    proc = subprocess.Popen([PY, "-c", _WRITER, loc], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = []
    try:
        assert proc.stdout.readline().strip() == "writing"
        while proc.poll() is None:
            raw = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()  # NoSuchKey: it vanished mid-write
            seen.append(decode_checkpoint(raw, loc)["epoch"])  # CheckpointError: a partial object was visible
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
    assert proc.returncode == 0 and seen and set(seen) <= {1, 2}
    assert storage.load_checkpoint(loc)["epoch"] == 2


def test_a_ray_checkpoint_on_s3_gets_a_full_uri_that_loads(seaweed, monkeypatch) -> None:
    """Ray's ``Checkpoint.path`` on S3 is ``bucket/prefix/...`` with no scheme; the tag needs the URI."""
    import ray.train

    _use(monkeypatch, seaweed)
    root = f"s3://{BUCKET}/ray-uri-{uuid.uuid4().hex[:8]}"
    storage.save_checkpoint(storage.join(root, "run", "checkpoint_x"), _state(3))
    fs, path = storage.filesystem(storage.join(root, "run", "checkpoint_x"))
    ckpt = ray.train.Checkpoint(path=path, filesystem=fs)
    assert not ckpt.path.startswith("s3://")
    uri = storage.checkpoint_uri(ckpt, root)
    assert uri == f"{root}/run/checkpoint_x"
    assert storage.load_checkpoint(uri)["epoch"] == 3
    local = ray.train.Checkpoint(path="/tmp/x/checkpoint_1")
    assert storage.checkpoint_uri(local, "/tmp/x") == "/tmp/x/checkpoint_1"


class _Clock:
    """Injected time for ``storage.retry_remote``: ``sleep`` advances ``now``."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def time(self) -> float:
        return self.now


def _flaky(errors: list[BaseException], value: str = "state"):
    calls = []

    def fn() -> str:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return value

    return fn, calls


def test_retry_remote_waits_out_transient_store_errors_only_and_only_for_its_window() -> None:
    refused = OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, Could not connect to server")
    busy = OSError("AWS Error INTERNAL_FAILURE during GetObject operation: We encountered an internal error, please try again.")
    uri = f"s3://{BUCKET}/run/checkpoint_x"

    # a store that comes back after two errors: two waits, 1 s then 2 s, each said in one line
    clock, said = _Clock(), []
    fn, calls = _flaky([refused, busy])
    out = storage.retry_remote(fn, location=uri, what="reading checkpoint x", wait_s=60, sleep=clock.sleep,
                               clock=clock.time, say=said.append)
    assert (out, len(calls), clock.sleeps) == ("state", 3, [1.0, 2.0])
    assert said[0].startswith("sprout: reading checkpoint x failed (the endpoint is unreachable")
    assert "INTERNAL_FAILURE" in said[1] and storage.RESTORE_WAIT_ENV in said[1]

    # one that never comes back: backoff 1, 2, 4, 8, 10, 10 .. up to the window, then its last error
    clock, said = _Clock(), []
    fn, calls = _flaky([refused] * 100)
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        storage.retry_remote(fn, location=uri, what="x", wait_s=30, sleep=clock.sleep, clock=clock.time,
                             say=said.append)
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0, 10.0, 5.0] and clock.now == 30.0 and len(calls) == 7

    # errors that do not heal are raised at once: missing object, wrong credentials, missing bucket
    for err in (FileNotFoundError("no such key"), OSError("AWS Error ACCESS_DENIED during GetObject operation"),
                OSError("AWS Error NO_SUCH_BUCKET during GetObject operation"), ValueError("bad checkpoint")):
        clock = _Clock()
        fn, calls = _flaky([err])
        with pytest.raises(type(err)):
            storage.retry_remote(fn, location=uri, what="x", wait_s=60, sleep=clock.sleep, clock=clock.time,
                                 say=said.append)
        assert (len(calls), clock.sleeps) == (1, [])

    # a local path is read once (a local disk error does not heal); the window 0 turns retries off
    for location, wait in (("/tmp/run/checkpoint_x", 60.0), (uri, 0.0)):
        clock = _Clock()
        fn, calls = _flaky([refused])
        with pytest.raises(OSError):
            storage.retry_remote(fn, location=location, what="x", wait_s=wait, sleep=clock.sleep,
                                 clock=clock.time, say=said.append)
        assert (len(calls), clock.sleeps) == (1, [])


def test_a_bad_restore_wait_is_refused_naming_the_variable(monkeypatch) -> None:
    monkeypatch.setenv(storage.RESTORE_WAIT_ENV, "soon")
    fn, calls = _flaky([])
    with pytest.raises(ValueError, match=r"SPROUT_S3_RESTORE_WAIT_S='soon': expected a number of seconds"):
        storage.retry_remote(fn, location=f"s3://{BUCKET}/x", what="x")
    assert calls == []
    assert storage.retry_remote(fn, location="/tmp/x", what="x") == "state"  # a local path never reads it


@pytest.mark.slow
def test_a_restarted_worker_reads_its_s3_checkpoint_once_the_stopped_store_is_back(tmp_path, monkeypatch, capsys) -> None:
    """What a worker group restarted after an S3 error does first (``ray_train._read_checkpoint``):
    with the store stopped it retries, and it gives up after its window; started again, the
    read returns the checkpoint. Its own SeaweedFS (the shared one stays up)."""
    import threading

    import ray.train

    from orchestrator.ray_train import _read_checkpoint

    s3 = SeaweedS3(tmp_path / "weed-restore", buckets=(BUCKET,)).start()
    try:
        _use(monkeypatch, s3)
        root = f"s3://{BUCKET}/restore"
        storage.save_checkpoint(storage.join(root, "checkpoint_x"), _state(5))
        fs, path = storage.filesystem(storage.join(root, "checkpoint_x"))
        ckpt = ray.train.Checkpoint(path=path, filesystem=fs)
        assert _read_checkpoint(ckpt, root)["epoch"] == 5
        capsys.readouterr()

        s3.stop()
        monkeypatch.setenv(storage.RESTORE_WAIT_ENV, "6")  # one read fails in ~2.5 s (its own retries)
        with pytest.raises(OSError, match="NETWORK_CONNECTION|connect"):
            _read_checkpoint(ckpt, root)
        assert "sprout: reading checkpoint" in capsys.readouterr().err

        monkeypatch.setenv(storage.RESTORE_WAIT_ENV, "300")  # a guard: the store is started again below
        errors: list[BaseException] = []

        def start_again() -> None:
            time.sleep(3)
            try:
                s3.start()
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        t = threading.Thread(target=start_again)
        t.start()
        state = _read_checkpoint(ckpt, root)
        t.join()
        assert not errors, errors
        assert state["epoch"] == 5 and torch.equal(state["model"]["w"], _state(5)["model"]["w"])
        tries = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sprout: reading checkpoint")]
        assert tries and "trying again" in tries[0], tries  # it did read while the store was down
    finally:
        s3.stop()


def test_buffered_metrics_fall_back_to_an_s3_object_and_replay_from_it(seaweed, tmp_path, monkeypatch) -> None:
    """With the tracking server down at close(), pending metrics go to the fallback object on S3;
    ``sprout replay-metrics s3://...`` delivers them and removes it."""
    from orchestrator.tracking import MetricLogger

    _use(monkeypatch, seaweed)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(store)
    run = c.create_run(tracking.experiment_id(c, "test-s3-fallback"))
    fallback = f"s3://{BUCKET}/fallback-{uuid.uuid4().hex[:8]}/run/mlflow_pending.jsonl"
    logger = MetricLogger(f"http://127.0.0.1:{free_port()}", run.info.run_id, fallback=fallback)
    logger.log({"train/loss": 0.5, "val/clean_acc": 0.75}, step=1)
    logger.log({"train/loss": 0.25}, step=2)
    logger.close(retries=1, wait_s=0)
    key = fallback.split(f"{BUCKET}/", 1)[1]
    assert seaweed.keys(BUCKET, key) == [key]
    out = subprocess.run([PY, "-m", "orchestrator", "replay-metrics", fallback], capture_output=True, text=True,
                         env=dict(os.environ, MLFLOW_TRACKING_URI=store), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "delivered 3 metric values" in out.stdout
    assert _steps(c, run.info.run_id, "train/loss") == [1, 2]
    assert [m.value for m in c.get_metric_history(run.info.run_id, "val/clean_acc")] == [0.75]
    assert seaweed.keys(BUCKET, key) == []


def test_prepare_data_writes_parquet_shards_to_s3(seaweed, tmp_path, monkeypatch) -> None:
    import pyarrow.parquet as pq

    from orchestrator.prepare_data import prepare_data_cli
    from tests.orchestrator.imagenet_fixture import make_imagenet

    _use(monkeypatch, seaweed)
    labels = make_imagenet(tmp_path / "src", corrupt=False)
    dst = f"s3://{BUCKET}/imagenet-{uuid.uuid4().hex[:8]}"
    assert prepare_data_cli("imagenet", str(tmp_path / "src"), dst, 0.012, 1, "skip", progress=False) == 0
    prefix = dst.split(f"{BUCKET}/", 1)[1]
    keys = seaweed.keys(BUCKET, prefix + "/")
    assert f"{prefix}/manifest.json" in keys and f"{prefix}/classes.json" in keys
    assert not [k for k in keys if ".tmp-" in k]
    assert json.loads(storage.read_bytes(f"{dst}/manifest.json"))["complete"] is True
    fs, _ = storage.filesystem(dst)
    rows = []
    for k in sorted(k for k in keys if k.endswith(".parquet")):
        with fs.open_input_file(f"{BUCKET}/{k}") as f:
            rows += pq.read_table(f).to_pylist()
    assert {r["path"]: r["label"] for r in rows} == labels


# ----------------------------------------------------------------------------- preflight (exit 2, nothing written)


_BAD = {
    "endpoint": ("the endpoint is unreachable", lambda s3: {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}),
    "bucket": ("the bucket does not exist", lambda s3: {}),
    "credentials": ("wrong or missing credentials", lambda s3: {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}),
}


@pytest.mark.parametrize(("command", "fault"), [
    ("train", "endpoint"), ("train", "bucket"), ("train", "credentials"), ("sweep", "credentials"),
    ("compare", "bucket"),
])
def test_unusable_storage_exits_2_with_one_line_and_writes_nothing(seaweed, tmp_path, command, fault) -> None:
    reason, env_change = _BAD[fault]
    bucket = f"missing-{uuid.uuid4().hex[:8]}" if fault == "bucket" else BUCKET
    prefix = f"preflight-{uuid.uuid4().hex[:8]}"
    path = f"s3://{bucket}/{prefix}"
    args = {"train": ["train", str(DIGITS), "--name", "pf"], "sweep": ["sweep", str(DIGITS), "--space", "sensitivity"],
            "compare": ["compare", str(DIGITS), "--methods", "natural,sprout"]}[command]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = _env(seaweed, tmp_path, **env_change(seaweed))
    out = subprocess.run([PY, "-m", "orchestrator", *args, *_sets([f"storage.path={path}", *CHEAP])], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = _nonblank(out.stderr)
    assert len(lines) == 1, lines
    assert f"storage.path {path}" in lines[0] and reason in lines[0], lines[0]
    assert "Traceback" not in out.stderr and "not-the-secret" not in out.stderr
    # nothing written: no object under the prefix, no bucket created, no MLflow store, no Ray results
    assert seaweed.keys(BUCKET, prefix) == []
    if fault == "bucket":
        assert bucket not in [b["Name"] for b in seaweed.client().list_buckets()["Buckets"]]
    assert list(cwd.iterdir()) == [] and not (tmp_path / "mlflow.db").exists() and not (tmp_path / "debug").exists()


# ----------------------------------------------------------------------------- sprout on S3 (real Ray)


@pytest.fixture(scope="module")
def s3_resumed_run(seaweed, tmp_path_factory):
    """``sprout train`` on ``s3://sprout/<prefix>``, SIGKILLed (driver and Ray) once 2 epochs are
    checkpointed on S3, then the same command again with ``--verbose``, in which rank 0 SIGKILLs
    itself once as its 4th epoch starts (a lost worker: Ray Train restarts the group from the S3
    checkpoint of epoch 3). Shared by the tests that need a finished run."""
    import ray

    ray.shutdown()
    tmp = tmp_path_factory.mktemp("s3run")
    prefix, name, exp, epochs = f"runs-{uuid.uuid4().hex[:8]}", "s3-digits", "test-s3", 4
    env = _env(seaweed, tmp)
    debug = tmp / "debug" / name
    debug.mkdir(parents=True)
    (debug / "pause-at-epoch").write_text("2")  # rank 0 waits before its 3rd epoch: the kill lands mid-run
    cmd = _train(name, [f"storage.path=s3://{BUCKET}/{prefix}", f"experiment={exp}", f"train.epochs={epochs}", *CHEAP])
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_until(proc, lambda: (debug / "paused-at-epoch-2").exists() and _ckpt_epoch_on_s3(seaweed, f"{prefix}/{name}") >= 2,
                    "2 epochs checkpointed on S3")
    finally:
        _kill_group(proc)
    first_pid = _pid(debug, 0)
    (debug / "kill-at-epoch").write_text("3")  # the re-run's rank 0 SIGKILLs itself once, at its 4th epoch
    # --verbose (issue 15): Ray's and the workers' own output streams to the console, no log file
    rerun = subprocess.run([*cmd, "--verbose"], env=env, cwd=tmp, capture_output=True, text=True,
                           timeout=HANG_GUARD_S)
    return {"tmp": tmp, "env": env, "prefix": prefix, "name": name, "exp": exp, "epochs": epochs, "debug": debug,
            "first_pid": first_pid, "rerun": rerun, "store": env["MLFLOW_TRACKING_URI"]}


@pytest.mark.ray
@pytest.mark.slow
def test_train_on_s3_keeps_checkpoints_as_objects_and_a_rerun_resumes_from_them(seaweed, s3_resumed_run, monkeypatch) -> None:
    r = s3_resumed_run
    out = r["rerun"]
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(resumed)" in out.stdout
    c = tracking.client(r["store"])
    runs = _runs_with_key(c, r["exp"], r["name"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert _steps(c, run_id, "train/loss") == list(range(1, r["epochs"] + 1))  # none lost, none twice
    # the checkpoints are objects in the bucket; nothing went to a local ray_results
    keys = _checkpoint_keys(seaweed, f"{r['prefix']}/{r['name']}")
    assert len(keys) == r["epochs"], keys
    assert not (r["tmp"] / "ray_results").exists()
    # the selected checkpoint is a full URI that loads (checksum, weights_only)
    selected = c.get_run(run_id).data.tags["sprout.selected_checkpoint"]
    assert selected.startswith(f"s3://{BUCKET}/{r['prefix']}/{r['name']}/checkpoint_"), selected
    _use(monkeypatch, seaweed)
    assert 0 <= storage.load_checkpoint(selected)["epoch"] < r["epochs"]
    for k in keys:
        assert storage.load_checkpoint(f"s3://{BUCKET}/{k}")["model"]
    # the epochs checkpointed before the driver's kill were not trained again: same worker process as before
    assert _pid(r["debug"], 0) == _pid(r["debug"], 1) == r["first_pid"], "an epoch before the S3 checkpoint was retrained"
    # the re-run's worker trained epoch 3 and was killed as epoch 4 began (the drill kills once the
    # controller has registered epoch 3's checkpoint); Ray restarted the worker group, and the new
    # worker restored that checkpoint from S3 (the only storage) and trained epoch 4 alone
    killed = int((r["debug"] / "killed-at-epoch-3").read_text())  # the fault was injected, in the re-run
    assert _pid(r["debug"], 2) == killed != r["first_pid"]
    assert _pid(r["debug"], 3) not in (killed, r["first_pid"])
    both = out.stdout + out.stderr  # --verbose: the workers' own output, and no log file line
    assert "RayTrainWorker" in both and "TrainingReport" in both
    assert not re.search(r"^log: ", out.stderr, re.M)


@pytest.mark.ray
@pytest.mark.slow
def test_sprout_eval_run_id_loads_the_selected_checkpoint_from_s3(seaweed, s3_resumed_run) -> None:
    r = s3_resumed_run
    assert r["rerun"].returncode == 0, r["rerun"].stderr[-3000:]
    c = tracking.client(r["store"])
    run_id = _runs_with_key(c, r["exp"], r["name"])[0].info.run_id
    out = subprocess.run([PY, "-m", "orchestrator", "eval", "--run-id", run_id, "--attacks", "pgd20",
                          "--n-examples", "40", "--shards", "1"], env=r["env"], cwd=r["tmp"], capture_output=True,
                         text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr[-3000:]
    m = c.get_run(run_id).data.metrics
    assert 0.0 <= m["test/pgd20_acc"] <= m["test/clean_acc"] <= 1.0


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_and_ctrl_c_stop_sprout_compare_on_s3_and_the_rerun_finishes_sprout_from_naturals_s3_checkpoint(
        seaweed, tmp_path, no_inprocess_ray) -> None:
    """A real `sprout compare --methods natural,sprout` (3 epochs) on ``s3://``: `kill PID` (SIGTERM)
    while natural (phase 1) is held at the start of epoch 2 after its first checkpoint: exit 130,
    no SPROUT phase, parent and child KILLED. The re-run gets Ctrl-C (SIGINT to its process group)
    while SPROUT (phase 2) is held the same way. A third run finishes: no checkpointed epoch is
    trained again, SPROUT started from natural's selected checkpoint on S3, and the user sees the
    table of the logged numbers, the ranking, masking and the parent run's link."""
    epochs, name, exp, prefix = 3, "cmp-s3", "test-s3-compare", f"compare-{uuid.uuid4().hex[:8]}"
    env, debug = _env(seaweed, tmp_path), tmp_path / "debug"
    cmd = [PY, "-m", "orchestrator", "compare", str(DIGITS), "--methods", "natural,sprout", "--attacks", "pgd20",
           "--n-examples", "40", "--name", name,
           *_sets([f"storage.path=s3://{BUCKET}/{prefix}", f"experiment={exp}", f"train.epochs={epochs}", *CHEAP])]
    c = tracking.client(env["MLFLOW_TRACKING_URI"])
    for phase in ("natural", "sprout"):  # each holds at epoch 2 once: the signals land mid-phase
        (debug / f"{name}-{phase}").mkdir(parents=True)
        (debug / f"{name}-{phase}" / "pause-at-epoch").write_text("1")

    def on_s3(method: str) -> int:  # 1-based epoch of the checkpoint a re-run resumes from
        return _ckpt_epoch_on_s3(seaweed, f"{prefix}/{name}-{method}")

    def held(method: str) -> bool:  # held before epoch 2, its epoch-1 checkpoint registered on S3
        # (the local marker first: each S3 look is a new boto3 client, too costly to poll alone)
        return (debug / f"{name}-{method}" / "paused-at-epoch-1").exists() and on_s3(method) >= 1

    def pids(method: str, upto: int) -> dict[int, int]:
        return {e: _record_pid(debug / f"{name}-{method}", e) for e in range(upto)}

    code = _stop_with(signal.SIGTERM, False, cmd, env, tmp_path, tmp_path / "term.err", lambda: held("natural"))
    assert code == 130, (tmp_path / "term.err").read_text()[-3000:]
    parent, kids = _children(c, exp, name)
    assert parent.info.status == "KILLED"
    assert [(k.info.run_name, k.info.status) for k in kids] == [(f"{name}-natural", "KILLED")]
    kept = pids("natural", on_s3("natural"))
    assert kept and len(kept) < epochs

    code = _stop_with(signal.SIGINT, True, cmd, env, tmp_path, tmp_path / "int.err", lambda: held("sprout"))
    stderr = (tmp_path / "int.err").read_text()
    assert code == 130, stderr[-3000:]
    assert "re-run the same command to resume" in stderr
    parent, kids = _children(c, exp, name)
    assert parent.info.status == "KILLED"
    assert sorted((k.info.run_name, k.info.status) for k in kids) == [
        (f"{name}-natural", "FINISHED"), (f"{name}-sprout", "KILLED")]
    assert pids("natural", len(kept)) == kept  # resumed from S3: the checkpointed epochs kept their pids
    kept_sprout = pids("sprout", on_s3("sprout"))
    assert kept_sprout and len(kept_sprout) < epochs
    natural_done = pids("natural", epochs)

    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr[-3000:]
    parent, kids = _children(c, exp, name)
    assert parent.info.status == "FINISHED"
    natural, sprout = (_runs_with_key(c, exp, f"{name}/{m}")[0] for m in ("natural", "sprout"))
    assert sorted(k.info.run_id for k in kids) == sorted(r.info.run_id for r in (natural, sprout))
    assert pids("natural", epochs) == natural_done  # not trained again
    assert pids("sprout", len(kept_sprout)) == kept_sprout
    nat_ckpt = natural.data.tags["sprout.selected_checkpoint"]
    assert nat_ckpt.startswith(f"s3://{BUCKET}/{prefix}/{name}-natural/checkpoint_"), nat_ckpt
    assert sprout.data.params["train.init_from"] == nat_ckpt  # SPROUT started from natural's S3 checkpoint
    for run in (natural, sprout):
        assert run.info.status == "FINISHED"
        assert _steps(c, run.info.run_id, "train/loss") == list(range(1, epochs + 1))
        assert 0.0 <= run.data.metrics["test/pgd20_acc"] <= run.data.metrics["test/clean_acc"] <= 1.0
        assert run.data.tags["sprout.selected_checkpoint"].startswith(f"s3://{BUCKET}/{prefix}/")
    assert _checkpoint_keys(seaweed, f"{prefix}/{name}-natural") and _checkpoint_keys(seaweed, f"{prefix}/{name}-sprout")
    assert not (tmp_path / "ray_results").exists()
    # what the user sees at the end (issue 15): the aligned table of the logged numbers, the
    # ranking, masking in words, then the link to the parent run; a few lines in all (the demo's
    # test checks the epoch lines of a comparison that trains every epoch in one run)
    assert len(_nonblank(out.stdout + out.stderr)) <= 30, out.stdout + out.stderr
    evals = [line.split(" done")[0] for line in _nonblank(out.stderr) if line.startswith("eval ")]
    assert sorted(evals) == ["eval natural: pgd20", "eval sprout: pgd20"], out.stderr
    stdout = _nonblank(out.stdout)
    assert stdout[-1].startswith(f"MLflow parent run: http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}"
                                 f"/runs/{parent.info.run_id}"), stdout[-3:]
    head = next(i for i, line in enumerate(stdout) if line.split()[:2] == ["method", "clean"])
    assert "PGD-20 ε=0.1" in stdout[head] and set(stdout[head + 1]) <= {"-", " "}
    table = {line.split()[0]: line.split() for line in stdout[head + 2:head + 4]}
    assert set(table) == {"natural", "sprout"}
    for m, run in (("natural", natural), ("sprout", sprout)):
        assert table[m][1] == f"{run.data.metrics['test/clean_acc']:.3f}"
        assert table[m][2] == f"{run.data.metrics['test/pgd20_acc']:.3f}"
    ranked = sorted((natural, sprout), key=lambda r: -r.data.metrics["test/pgd20_acc"])
    assert stdout[head + 4].startswith("ranking by PGD-20 ε=0.1: ")
    assert stdout[head + 5].startswith("gradient masking: ")
    assert [line.split()[0] for line in stdout[head + 2:head + 4]] == [r.data.tags["method"] for r in ranked]


# ----------------------------------------------------------------------------- S3 down mid-run


@pytest.mark.ray
@pytest.mark.slow
def test_s3_stopped_mid_run_then_restarted_keeps_every_checkpoint_and_a_rerun_resumes(tmp_path, no_inprocess_ray, monkeypatch) -> None:
    """Its own SeaweedFS (the shared one stays up): stopped while rank 0 is held before epoch 3,
    started again (same ports, same data) once the worker group Ray restarted after the failed
    checkpoint write is retrying its read of the last checkpoint (``storage.retry_remote``)."""
    s3 = SeaweedS3(tmp_path / "weed-fault", buckets=(BUCKET,)).start()
    try:
        name, exp, prefix, epochs = "s3-down", "test-s3-down", "down", 4
        env = _env(s3, tmp_path)
        debug = tmp_path / "debug" / name
        debug.mkdir(parents=True)
        (debug / "pause-at-epoch").write_text("2")
        cmd = _train(name, [f"storage.path=s3://{BUCKET}/{prefix}", f"experiment={exp}", f"train.epochs={epochs}",
                            "train.max_failures=1", *CHEAP])
        err = (tmp_path / "first.err").open("w")
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            _wait_until(proc, lambda: (debug / "paused-at-epoch-2").exists() and _ckpt_epoch_on_s3(s3, f"{prefix}/{name}") >= 2,
                        "2 epochs checkpointed on S3")
            first_pid = _pid(debug, 0)
            s3.stop()  # the object store goes away ...
            (debug / "resume").write_text("")  # ... while epoch 3 trains and must write its checkpoint
            log = Path((tmp_path / "first.err").read_text().split()[1])  # "log: PATH  (Ray's and the workers' output ...)"

            def retrying() -> bool:  # the restarted worker group's first read of epoch 2's checkpoint failed
                text = log.read_text(errors="replace") if log.exists() else ""
                return any("sprout: reading checkpoint" in ln and "trying again" in ln for ln in text.splitlines())

            _wait_until(proc, retrying, "the restarted worker retrying its checkpoint read", tmp_path / "first.err")
            s3.start()  # ... and comes back (same ports, same data), inside the default 60 s window
            code = proc.wait(timeout=HANG_GUARD_S)
        finally:
            if proc.poll() is None:
                _kill_group(proc)
            err.close()
        stderr = (tmp_path / "first.err").read_text()
        c = tracking.client(env["MLFLOW_TRACKING_URI"])
        run = _runs_with_key(c, exp, name)[0]
        print(f"S3 outage outcome: exit {code}; last stderr line: {(_nonblank(stderr) or [''])[-1][:300]}")
        # the outage hit epoch 3's checkpoint write, Ray restarted the worker group (a new rank-0 pid
        # for epoch 3), the new group waited for S3 to come back to read epoch 2's checkpoint, and the
        # run finished with its one retry (train.max_failures=1)
        assert code == 0, stderr[-3000:]
        assert run.info.status == "FINISHED"
        assert _pid(debug, 2) != first_pid, "S3 was down at epoch 3's checkpoint, yet no worker was restarted"
        assert _pid(debug, 3) == _pid(debug, 2)  # epoch 4 in the same restarted worker: one retry was enough
        _use(monkeypatch, s3)
        keys = _checkpoint_keys(s3, f"{prefix}/{name}")
        assert len(keys) >= 2
        for k in keys:  # every checkpoint already written is complete and loads
            assert storage.load_checkpoint(f"s3://{BUCKET}/{k}")["model"]

        rerun = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_S)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "(resumed)" in rerun.stdout
        run = c.get_run(run.info.run_id)
        assert run.info.status == "FINISHED"
        assert _steps(c, run.info.run_id, "train/loss") == list(range(1, epochs + 1))
        assert _pid(debug, 0) == _pid(debug, 1) == first_pid  # the checkpointed epochs were not retrained
    finally:
        s3.stop()
