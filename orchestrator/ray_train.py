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

DEBUG_DIR_ENV = "SPROUT_DEBUG_DIR"  # when set, each worker records what it saw (tests, audits)
KILL_AT_EPOCH_ENV = "SPROUT_FAULT_KILL_AT_EPOCH"  # fault injection: SIGKILL rank 0 once at this epoch


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _maybe_inject_fault(epoch: int, rank: int) -> None:
    spec = os.environ.get(KILL_AT_EPOCH_ENV)
    debug = os.environ.get(DEBUG_DIR_ENV)
    if not spec or not debug or rank != 0 or int(spec) != epoch:
        return
    marker = Path(debug) / f"killed-at-epoch-{epoch}"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def _record(rank: int, epoch: int, payload: dict[str, Any]) -> None:
    debug = os.environ.get(DEBUG_DIR_ENV)
    if debug:
        Path(debug).mkdir(parents=True, exist_ok=True)
        (Path(debug) / f"worker-{rank}-epoch-{epoch}.json").write_text(json.dumps(payload))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from orchestrator.config import from_dict
    from orchestrator.tracking import MetricLogger
    from orchestrator.worker import build_run, evaluate_val, step_options
    from trainables.checkpoint import load_checkpoint, save_checkpoint
    from trainables.loop import EpochStats, lr_at, restore_state, train_epoch, training_state

    cfg = from_dict(config["cfg"])
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
        with ckpt.as_directory() as d:
            start = restore_state(load_checkpoint(d), model, run.optimizer, run.method)

    logger = None
    if rank == 0 and config.get("mlflow_run_id"):
        logger = MetricLogger(config["mlflow_uri"], config["mlflow_run_id"], fallback=config.get("mlflow_fallback"))

    for epoch in range(start, run.epochs):
        for g in run.optimizer.param_groups:
            g["lr"] = lr_at(epoch, run.epochs, run.optim)
        if hasattr(run.train_loader, "sampler") and os.environ.get(DEBUG_DIR_ENV):
            run.train_loader.sampler.set_epoch(epoch)
            _record(rank, epoch, {"pid": os.getpid(), "indices": [int(i) for i in run.train_loader.sampler]})
        _maybe_inject_fault(epoch, rank)
        t0 = time.perf_counter()
        local = train_epoch(
            model, run.method, run.optimizer, run.train_loader, device, epoch=epoch, seed=cfg.train.seed,
            rank=rank, opts=opts, max_steps=cfg.train.max_steps_per_epoch,
        )
        total = EpochStats.from_tensor(_all_reduce_sum(local.as_tensor()), local.seconds, local.extra)
        metrics = total.metrics()
        metrics["time/epoch_s"] = time.perf_counter() - t0
        metrics["time/samples_per_s"] = total.count / metrics["time/epoch_s"]
        metrics.update(evaluate_val(cfg, model, run, device, _all_reduce_sum, opts))
        metrics["epoch"] = epoch + 1
        if rank == 0:
            if logger is not None:
                logger.log({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch + 1)
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, training_state(model, run.optimizer, run.method, epoch, world_size=world))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
    if logger is not None:
        logger.close()
