"""The one module that adapts the plain-PyTorch training core to Ray Train (V2).

``train_loop_per_worker`` parses the config dict again inside the worker, builds the data
shard (DistributedSampler: each worker a disjoint shard), the DDP model, the method and
its optimizers, resumes from ``ray.train.get_checkpoint()``, and runs
``trainables.loop.train_epoch``. Epoch sums are all-reduced (exact, not means of means).
Rank 0 writes the checkpoint and logs per-epoch metrics to MLflow; every rank reports.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# When set, each worker records under $SPROUT_DEBUG_DIR/<run name>/ the sample indices it
# trained on per epoch (audits of data sharding); a file ``kill-at-epoch`` there holding an
# epoch number makes rank 0 SIGKILL itself once at that epoch, and ``pause-at-epoch`` holds
# it once there until a ``resume`` file appears (fault-injection drills). A ``pause-at-epoch``
# in $SPROUT_DEBUG_DIR itself holds every run of the job (a sweep's trials, named by Tune).
DEBUG_DIR_ENV = "SPROUT_DEBUG_DIR"


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _debug_dir(name: str) -> Path | None:
    root = os.environ.get(DEBUG_DIR_ENV)
    return Path(root) / name if root else None


def checkpoint_due(epoch: int, epochs: int, every: int) -> bool:
    """Whether 0-based ``epoch`` ends with a checkpoint: every ``train.checkpoint_every`` epochs
    and always the last one (the final model and ``sprout eval --run-id`` need it)."""
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


def _epoch_in(path: Path, tries: int = 50) -> int:
    """The epoch a drill file names. A test that rewrites it in place can be read between the
    truncate and the write (seen in CI: ``''``), so an empty read is read again."""
    for _ in range(tries):
        text = path.read_text().strip()
        if text:
            return int(text)
        time.sleep(0.02)
    raise ValueError(f"drill file {path} stayed empty; it must hold an epoch number")


def _maybe_inject_fault(name: str, epoch: int, rank: int) -> None:
    d = _debug_dir(name)
    if d is None or rank != 0 or not (d / "kill-at-epoch").is_file():
        return
    marker = d / f"killed-at-epoch-{epoch}"
    if _epoch_in(d / "kill-at-epoch") != epoch or marker.exists():
        return
    _wait_until_registered()
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_until_registered(timeout_s: float = 120.0) -> None:
    """Drill hook: hold until Ray Train's controller has registered this worker's last reported
    checkpoint (its name is in the run's ``checkpoint_manager_snapshot.json``).

    The controller takes reports by polling the workers; a worker killed between its report
    and the next poll loses that report, and the run restarts from the one before (Ray's own
    semantics). The drills model the loss of a worker after its checkpoint was recorded, so
    the epoch they resume from does not depend on how loaded the machine is."""
    import posixpath

    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return
    storage = ray.train.get_context().get_storage()
    fs = storage.storage_filesystem
    snapshot = posixpath.join(storage.experiment_fs_path, "checkpoint_manager_snapshot.json")
    want = posixpath.basename(ckpt.path.rstrip("/"))
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with fs.open_input_stream(snapshot) as f:
                if want in f.read().decode():
                    return
        except (FileNotFoundError, OSError):
            pass
        time.sleep(0.1)


def _maybe_pause(name: str, epoch: int, rank: int, timeout_s: float = 300.0) -> None:
    """Drill hook: a ``pause-at-epoch`` file (the run's, else the job's) holds rank 0 once at
    that epoch until the run's ``resume`` appears, so a test can take a node away or stop the
    job while the run is provably mid-flight."""
    d = _debug_dir(name)
    if d is None or rank != 0:
        return
    pause = next((f for f in (d / "pause-at-epoch", d.parent / "pause-at-epoch") if f.is_file()), None)
    marker = d / f"paused-at-epoch-{epoch}"
    if pause is None or _epoch_in(pause) != epoch or marker.exists():
        return
    d.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    deadline = time.time() + timeout_s
    while not (d / "resume").exists() and time.time() < deadline:
        time.sleep(0.1)


def _record(name: str, rank: int, epoch: int, payload: dict[str, Any]) -> None:
    d = _debug_dir(name)
    if d is not None:
        import ray

        payload = {**payload, "node_id": ray.get_runtime_context().get_node_id()}
        d.mkdir(parents=True, exist_ok=True)
        (d / f"worker-{rank}-epoch-{epoch}.json").write_text(json.dumps(payload))


def _read_checkpoint(ckpt: Any, storage_path: str) -> dict[str, Any]:
    """The state of the checkpoint a (re)started worker group resumes from. On object storage the
    read waits out a store that is still coming back (``storage.retry_remote``): the restart
    usually follows a storage error, and failing here would spend another of ``max_failures``."""

    from orchestrator import storage
    from trainables.checkpoint import load_checkpoint

    def read() -> dict[str, Any]:
        with ckpt.as_directory() as d:
            return load_checkpoint(d)

    return storage.retry_remote(read, location=storage_path, what=f"reading checkpoint {ckpt.path}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from orchestrator.config import from_dict
    from orchestrator.tracking import MetricLogger
    from orchestrator.worker import RayShardLoader, build_run, evaluate_val, step_options
    from trainables.checkpoint import save_checkpoint
    from trainables.loop import (
        EpochStats,
        NonFiniteLossError,
        restore_state,
        set_epoch_lr,
        train_epoch,
        training_state,
    )

    cfg = from_dict(config["cfg"])
    name = config.get("name", "run")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, round(cfg.scaling.cpus_per_worker)))

    run = build_run(cfg, rank=rank, world=world, device=device)
    model = ray.train.torch.prepare_model(run.model)
    if cfg.train.compile:
        model = torch.compile(model)
    opts = step_options(cfg, device)

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        start = restore_state(_read_checkpoint(ckpt, cfg.storage.path), model, run.optimizer, run.method)

    logger = None
    if rank == 0 and config.get("mlflow_run_id"):
        # MLflow's default HTTP retries block ~4 min per call when the server is down; the
        # logger buffers instead, so fail fast here and keep training (docs/reliability.md).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        logger = MetricLogger(config["mlflow_uri"], config["mlflow_run_id"], fallback=config.get("mlflow_fallback"))

    for epoch in range(start, run.epochs):
        lr = set_epoch_lr(run.optimizer, run.method, epoch, run.epochs, run.optim)  # β's lr follows it
        if hasattr(run.train_loader, "sampler") and _debug_dir(name) is not None:
            run.train_loader.sampler.set_epoch(epoch)
            _record(name, rank, epoch, {"pid": os.getpid(), "indices": [int(i) for i in run.train_loader.sampler]})
        _maybe_inject_fault(name, epoch, rank)
        _maybe_pause(name, epoch, rank)
        t0 = time.perf_counter()
        try:
            local = train_epoch(
                model, run.method, run.optimizer, run.train_loader, device, epoch=epoch, seed=cfg.train.seed,
                rank=rank, opts=opts, max_steps=cfg.train.max_steps_per_epoch, any_rank=_all_reduce_sum,
                augment=run.augment,
            )
        except NonFiniteLossError as e:
            # Deterministic: a Ray retry would diverge again. Every rank stops together (the
            # flag was all-reduced); rank 0 records why, and the driver fails the run.
            if logger is not None:
                logger.close()
                MetricLogger.record_error(config["mlflow_uri"], config["mlflow_run_id"], str(e))
            return
        total = EpochStats.from_tensor(_all_reduce_sum(local.as_tensor()), local.seconds, local.extra)
        if isinstance(run.train_loader, RayShardLoader):
            _record(name, rank, epoch, {"pid": os.getpid(), "ids": run.train_loader.seen})
        metrics = total.metrics()
        metrics["train/lr"] = lr
        metrics["time/epoch_s"] = time.perf_counter() - t0
        metrics["time/samples_per_s"] = total.count / metrics["time/epoch_s"]
        metrics.update(evaluate_val(cfg, model, run, device, _all_reduce_sum, opts))
        # for Tune's scheduler, not MLflow: the trained epoch, and this run's own epoch count
        # (Free-AT's is train.epochs divided by its replays), so ASHA never stops a trial at its last
        metrics["epoch"], metrics["epochs"] = epoch + 1, run.epochs
        if rank == 0:
            if logger is not None:
                logger.log({k: v for k, v in metrics.items() if k not in ("epoch", "epochs")}, step=epoch + 1)
        if rank == 0 and checkpoint_due(epoch, run.epochs, cfg.train.checkpoint_every):
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, training_state(model, run.optimizer, run.method, epoch, world_size=world))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
    if logger is not None:
        logger.close()
