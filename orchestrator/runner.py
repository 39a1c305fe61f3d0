"""Driver side of one training run: MLflow run, Ray Train ``TorchTrainer``, final model.

Used by ``sprout train`` and, inside Tune trials, by ``sprout sweep`` and ``sprout
compare``. The same ``--name`` (or trial/method key) maps to the same Ray Train run
directory and the same MLflow run, so a re-run resumes instead of starting over.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import storage, tracking
from orchestrator.session import ensure_ray, plan_for


@dataclass
class TrainOutcome:
    name: str
    run_id: str
    checkpoint_path: str | None
    best_checkpoint_path: str | None
    metrics: dict[str, float]
    resumed: bool
    train_seconds: float


# Ray Train V2's controller poll interval (propagated to the controller by Ray); yours wins if set.
POLL_ENV, POLL_DEFAULT_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"


def storage_path(cfg: Any) -> str:
    p = cfg.storage.path
    return p if "://" in p else str(Path(p).expanduser().resolve())


def ray_storage_kwargs(location: str) -> dict[str, Any]:
    """``storage_path``/``storage_filesystem`` for Ray's RunConfig and Tuner.restore: Ray moves
    checkpoints and Tune state through the storage layer's own filesystem (its endpoint,
    region, timeouts and retries), not one Ray builds from the URI by itself."""
    path, fs = storage.ray_storage(location)
    return {"storage_path": path, "storage_filesystem": fs}


def default_name(cfg: Any) -> str:
    return f"{cfg.method}-{cfg.model.name}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def safe_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,127}", name):
        from orchestrator.config import ConfigError

        raise ConfigError(f"--name {name!r}: use letters, digits, '.', '_', '=', '-' (max 128), starting alphanumeric")
    return name


def run_tags(cfg: Any, kind: str) -> dict[str, str]:
    return {
        "method": cfg.method,
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "git_sha": tracking.git_sha(),
        "sprout_kind": kind,
        "accelerator": "gpu" if cfg.scaling.use_gpu else "cpu",
    }


def start_run(cfg: Any, name: str, *, kind: str = "train", parent_run_id: str | None = None,
              key: str | None = None) -> tuple[str, bool]:
    """The MLflow run of this training run (created, or found again), with params and config."""
    c = tracking.client()
    run_id, resumed = tracking.get_or_create_run(
        c, cfg.experiment, key or name, run_name=name, tags=run_tags(cfg, kind), parent_run_id=parent_run_id
    )
    tracking.log_params_once(c, run_id, cfg.flat())
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "config.yaml"
        p.write_text(cfg.to_yaml())
        c.log_artifact(run_id, str(p))
    return run_id, resumed


def fit_trainer(cfg: Any, name: str, run_id: str, *, in_tune: bool = False) -> Any:
    """Build and fit the TorchTrainer; returns Ray's Result."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.ray_train import train_loop_per_worker

    s = cfg.scaling
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(s.worker_start_timeout_s)
    # Ray Train V2 hands each worker's reports to the controller through a queue of one,
    # drained when the controller polls (every 2 s by default): epochs shorter than that
    # wait in report(). 0.5 s polls cost the controller little and let short epochs run.
    os.environ.setdefault(POLL_ENV, POLL_DEFAULT_S)
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    datasets = None
    if cfg.data.name == "imagenet" and cfg.data.format == "parquet":
        from orchestrator.ray_data import imagenet_parquet_datasets

        datasets = imagenet_parquet_datasets(
            cfg.data.root, seed=cfg.data.split_seed, val_fraction=cfg.data.val_fraction,
            image_size=cfg.data.image_size or 224, split_names=("train", "val"),
        )
    class _Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller: Any) -> None:
            # Ray Train's own Ctrl-C handler aborts the controller, then calls sys.exit: the run
            # went on for seconds, ended FAILED with exit 1 and no message. Keep Python's
            # KeyboardInterrupt instead: Ctrl-C stops like SIGTERM (run KILLED, exit 130, resumable).
            pass

    trainer = _Trainer(
        train_loop_per_worker,
        datasets=datasets,
        train_loop_config={
            "cfg": cfg.to_dict(),
            "name": name,
            "mlflow_uri": tracking.tracking_uri(),
            "mlflow_run_id": run_id,
            "mlflow_fallback": storage.join(storage_path(cfg), name, "mlflow_pending.jsonl"),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
            placement_strategy=s.placement_strategy, accelerator_type=s.accelerator_type,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            **ray_storage_kwargs(storage_path(cfg)),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.checkpoint_keep,
                checkpoint_score_attribute=_score_attr(cfg),
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.train.max_failures,
                # Ray's default retries a worker group that cannot be scheduled forever.
                controller_failure_limit=s.worker_start_retries,
            ),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()


def _short(error: BaseException, cfg: Any) -> str:
    """Ray's error, plus what was asked and what the cluster has when workers never started."""
    text = str(error)
    # Ray 2.60 raises a ControllerError whose ``controller_failure`` is the startup timeout.
    names = {type(error).__name__, type(getattr(error, "controller_failure", None)).__name__}
    if "WorkerGroupStartupTimeout" in text or "WorkerGroupStartupTimeoutError" in names:
        import ray

        s = cfg.scaling
        want = f"{s.num_workers} worker(s) × {{CPU: {s.cpus_per_worker:g}" + (
            f", GPU: {s.gpus_per_worker:g}}}" if s.use_gpu else "}")
        have = {k: float(ray.available_resources().get(k, 0.0)) for k in ("CPU", "GPU")}
        total = {k: float(ray.cluster_resources().get(k, 0.0)) for k in ("CPU", "GPU")}
        return (f"the cluster could not start {want} within {s.worker_start_timeout_s:g} s "
                f"× {s.worker_start_retries + 1} attempt(s); available now: {have}, cluster total: {total}")
    return text.strip().splitlines()[-1] if text.strip() else type(error).__name__


def _score_attr(cfg: Any) -> str:
    """The metric checkpoints are ranked by: ``config.checkpoint_metric`` (per method by default)."""
    from orchestrator.config import checkpoint_metric

    return checkpoint_metric(cfg)


def best_checkpoint_path(result: Any, cfg: Any) -> str | None:
    """The selected checkpoint's full location (a path, or ``s3://bucket/...``; never Ray's scheme-less path)."""
    attr = _score_attr(cfg)
    best = None
    for ckpt, metrics in getattr(result, "best_checkpoints", None) or []:
        score = metrics.get(attr)
        if score is not None and (best is None or score > best[1]):
            best = (ckpt, score)
    if best is not None:
        return storage.checkpoint_uri(best[0], storage_path(cfg))
    return storage.checkpoint_uri(result.checkpoint, storage_path(cfg)) if result.checkpoint is not None else None


def log_final_model(cfg: Any, run_id: str, checkpoint_path: str) -> None:
    """Log the selected checkpoint's model as ``model/`` (takes [0,1] images, returns logits).

    Saved as MLflow's ``pt2`` (``torch.export``): a traced graph plus tensors, no pickled
    Python objects and no model code, so :func:`load_logged_model` can refuse any archive that
    holds anything else. ``mlflow.pytorch.load_model`` returns the exported module, in eval
    mode for good (torch refuses ``.eval()``/``.train()`` on exported modules).
    """
    import mlflow
    import mlflow.pytorch
    import torch

    from orchestrator.worker import build_model, data_info

    c = tracking.client()
    if c.get_run(run_id).data.tags.get("sprout.model_logged") == "true":
        return
    info = data_info(cfg)
    model = build_model(cfg, info)
    model.load_state_dict(storage.load_checkpoint(checkpoint_path)["model"])
    model.eval()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    # batch of 2: torch.export keeps a size-1 dimension static, and the batch must stay dynamic
    example = torch.rand(2, info.channels, info.image_size, info.image_size).numpy()
    with mlflow.start_run(run_id=run_id):
        # explicit requirements skip MLflow's slow requirement inference
        mlflow.pytorch.log_model(
            model, name="model", serialization_format="pt2", input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
    c.set_tag(run_id, "sprout.model_logged", "true")
    c.set_tag(run_id, "sprout.selected_checkpoint", checkpoint_path)


def load_logged_model(model_uri: str) -> Any:
    """``mlflow.pytorch.load_model`` that runs no pickled code: MLflow checks that every record
    of the ``pt2`` archive is tensors or plain data before ``torch.export.load`` sees it, and
    refuses the model otherwise (MLflow's own default, ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``
    true, skips that check). ``model_uri``: ``runs:/<run id>/model`` or any MLflow model URI."""
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    key = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        return mlflow.pytorch.load_model(model_uri)
    except MlflowException as e:
        if "pickle" not in str(e):
            raise
        raise UnsafeModelError(f"{model_uri}: refused to load: {str(e).splitlines()[0]}") from None
    except (ValueError, RuntimeError) as e:
        # a weights record that is not the tensor bytes its config describes (a pickle put in
        # its place, a truncated file): torch reads records as raw bytes and never unpickles them;
        # depending on the path, torch raises the record's own error or wraps it
        chain, cur = [], e
        while cur is not None and len(chain) < 10:
            chain.append(str(cur))
            cur = cur.__cause__ or cur.__context__
        record = next((m for m in chain if "Record " in m), None)
        if record is None and "error when deserializing" not in str(e):
            raise
        raise UnsafeModelError(f"{model_uri}: refused to load a tampered or corrupt archive: "
                               f"{(record or str(e)).splitlines()[0]}") from None
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


class UnsafeModelError(RuntimeError):
    """A logged model whose archive holds something other than tensors and plain data."""


def run_epochs(cfg: Any) -> int:
    """Epochs the run trains (Free-AT divides the configured count by its replays)."""
    return max(1, math.ceil(cfg.train.epochs / getattr(cfg.method_params(), "replays", 1)))


def _watch(cfg: Any, name: str, run_id: str, resumed: bool, in_tune: bool) -> Any:
    """One live line for this run (sweeps and comparisons watch all their children instead)."""
    import contextlib

    if in_tune:
        return contextlib.nullcontext()
    from orchestrator.console import watch_run

    done = len(tracking.client().get_metric_history(run_id, "train/loss")) if resumed else 0
    return watch_run(tracking.tracking_uri(), run_id, name, run_epochs(cfg), done)


def run_training(
    cfg: Any, name: str, *, kind: str = "train", parent_run_id: str | None = None, key: str | None = None,
    in_tune: bool = False, log_model: bool = True, wait_for_nodes: bool = False,
) -> TrainOutcome:
    """One Ray Train run into its MLflow run. ``wait_for_nodes``: the cluster autoscales, so
    first wait (up to ``scaling.startup_timeout_s``) for the nodes of the plan to come up."""
    tracking.check_reachable()
    if not in_tune:
        ensure_ray()
    run_id, resumed = start_run(cfg, name, kind=kind, parent_run_id=parent_run_id, key=key)
    c = tracking.client()
    c.delete_tag(run_id, tracking.ERROR_TAG) if tracking.ERROR_TAG in c.get_run(run_id).data.tags else None
    t0 = time.perf_counter()
    try:
        if wait_for_nodes:
            from orchestrator.session import wait_for_capacity

            wait_for_capacity(plan_for(cfg), timeout_s=cfg.scaling.startup_timeout_s,
                              strategy=cfg.scaling.placement_strategy)
            t0 = time.perf_counter()  # training time starts when the nodes are there
        with _watch(cfg, name, run_id, resumed, in_tune):
            result = fit_trainer(cfg, name, run_id, in_tune=in_tune)
    except BaseException as e:
        from ray.exceptions import RayActorError
        from ray.train import TrainingFailedError

        if in_tune and isinstance(e, RayActorError):
            # Tune stopping this trial (ASHA, Ctrl-C, SIGTERM) removes its placement group and
            # with it the Train controller: not a failure. The sweep/compare driver closes the
            # run (FINISHED + early_stopped, or KILLED), or records the error Tune reports.
            raise
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        c.set_terminated(run_id, status=status)
        c.set_tag(run_id, tracking.ERROR_TAG, f"{type(e).__name__}: {e}"[:5000])

        if isinstance(e, TrainingFailedError):  # Ray 2.60 raises these from fit() (not Result.error)
            raise RuntimeError(f"training run {name!r} failed: {_short(e, cfg)}") from e
        raise
    elapsed = time.perf_counter() - t0
    if result.error is not None:
        c.set_terminated(run_id, status="FAILED")
        c.set_tag(run_id, tracking.ERROR_TAG, str(result.error)[:5000])
        raise RuntimeError(f"training run {name!r} failed: {_short(result.error, cfg)}")
    worker_error = c.get_run(run_id).data.tags.get(tracking.ERROR_TAG)
    if worker_error:
        c.set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"training run {name!r} failed: {worker_error}")
    plan = plan_for(cfg)
    accel = plan.gpus if cfg.scaling.use_gpu else plan.workers * plan.cpus_per_worker
    prev = c.get_run(run_id).data.metrics
    total = prev.get("time/train_total_s", 0.0) + elapsed if resumed else elapsed
    c.log_metric(run_id, "time/train_total_s", total)
    c.log_metric(run_id, "time/accelerator_hours", total * accel / 3600.0)
    try:  # reads the selected checkpoint back from storage: a failure here must not leave the run RUNNING
        best = best_checkpoint_path(result, cfg)
        if log_model and best is not None:
            log_final_model(cfg, run_id, best)
        elif best is not None:
            c.set_tag(run_id, "sprout.selected_checkpoint", best)
    except Exception as e:
        c.set_terminated(run_id, status="FAILED")
        c.set_tag(run_id, tracking.ERROR_TAG, f"{type(e).__name__}: {e}"[:5000])
        raise RuntimeError(f"training run {name!r} trained, but its final model could not be logged: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    c.set_terminated(run_id, status="FINISHED")
    return TrainOutcome(
        name=name, run_id=run_id,
        checkpoint_path=storage.checkpoint_uri(result.checkpoint, storage_path(cfg)) if result.checkpoint else None,
        best_checkpoint_path=best, metrics=dict(result.metrics or {}), resumed=resumed, train_seconds=total,
    )
