"""``sprout sweep``: Ray Tune over a named search space; every trial is a Ray Train run.

Ray 2.60 pattern: a Tune *function* trainable (holding a sliver of CPU, so it cannot
starve its own workers) builds and fits a ``TorchTrainer`` whose reports reach Tune via
``TuneReportCallback``; ASHA stops trials early on a validation metric. MLflow: a parent
run (``sprout_kind=sweep``) and one child run per trial, keyed by the trial id, so a
restored sweep finds its children again instead of duplicating them.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

from orchestrator import storage, tracking
from orchestrator.config import apply_overrides, from_dict
from orchestrator.console import epochs_from_params, watch_children
from orchestrator.runner import ray_storage_kwargs, run_tags, storage_path
from orchestrator.session import DRIVER_CPU, check_plan, cluster_capacity, ensure_ray, plan_for
from orchestrator.tune_fit import close_after, fit_tuner


def max_concurrent(cfg: Any, requested: int | None, available: dict[str, float]) -> int:
    """How many trials fit at once: each needs its workers' CPUs/GPUs plus a driver sliver."""
    plan = plan_for(cfg)
    per_trial_cpu = plan.workers * plan.cpus_per_worker + DRIVER_CPU
    fit = math.floor((available["CPU"] + 1e-9) / per_trial_cpu)
    if plan.gpus:
        fit = min(fit, math.floor((available["GPU"] + 1e-9) / plan.gpus))
    fit = max(fit, 1)
    return min(fit, requested) if requested else fit


def _trial(config: dict[str, Any], base: dict[str, Any], sweep: str, parent_run_id: str,
           wait_for_nodes: bool = False) -> None:
    import ray.tune

    from orchestrator.runner import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    overrides = list(config["overrides"].items())
    cfg = from_dict(apply_overrides(copy.deepcopy(base), overrides))
    key = f"{sweep}/{trial_id}"
    c = tracking.client()
    before = _epochs_logged(c, cfg.experiment, key, parent_run_id)
    outcome = run_training(
        cfg, f"{sweep}-{trial_id}", kind="train", parent_run_id=parent_run_id, key=key,
        in_tune=True, log_model=config.get("log_model", True), wait_for_nodes=wait_for_nodes,
    )
    done = _epochs_logged(c, cfg.experiment, key, parent_run_id)
    if done == before:
        # Every epoch was trained before this restart (the driver died after the trial finished,
        # before Tune recorded it): no epoch reported to Tune from this run, and Tune's own
        # metric-less final result fails the sweep ("did not include the specified metric").
        # Report the run's last epoch, as its training did.
        ray.tune.report({**c.get_run(outcome.run_id).data.metrics, "epoch": done, "epochs": done})


def _epochs_logged(c: Any, experiment: str, key: str, parent_run_id: str) -> int:
    run = tracking.find_run(c, tracking.experiment_id(c, experiment), key, parent_run_id)
    return 0 if run is None else len(c.get_metric_history(run.info.run_id, "train/loss"))


def make_tuner(cfg: Any, name: str, space: dict[str, Any], *, samples: int, scheduler: str, search: str,
               parent_run_id: str, concurrency: int, log_model: bool = True, wait_for_nodes: bool = False) -> Any:
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=cfg.to_dict(), sweep=name, parent_run_id=parent_run_id,
                             wait_for_nodes=wait_for_nodes),
        {"cpu": DRIVER_CPU},
    )
    path = storage.join(storage_path(cfg), name)  # a local path or a URI: Tune restores from both
    tune_path, tune_fs = storage.ray_storage(path)  # Tune's state through the storage layer's filesystem
    if tune.Tuner.can_restore(tune_path, storage_filesystem=tune_fs):
        return tune.Tuner.restore(tune_path, trainable=trainable, resume_errored=True,
                                  storage_filesystem=tune_fs)
    t = cfg.tune
    sched = None
    if scheduler == "asha":
        from orchestrator.asha import EpochASHA

        sched = EpochASHA(epochs=cfg.train.epochs, grace_period=t.grace_period, reduction_factor=t.reduction_factor)
    alg = None
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        alg = OptunaSearch()
    return tune.Tuner(
        trainable,
        param_space={"overrides": space, "log_model": log_model},
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, num_samples=samples, scheduler=sched, search_alg=alg,
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(name=name, **ray_storage_kwargs(storage_path(cfg))),
    )


def results_table(grid: Any, metric: str) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        row: dict[str, Any] = {"trial_id": (r.metrics or {}).get("trial_id", Path(r.path).name if r.path else "")}
        row.update({k: v for k, v in (r.config or {}).get("overrides", {}).items()})
        m = r.metrics or {}
        for k in (metric, "val/clean_acc", "val/pgd_acc", "train/loss", "epoch", "time/epoch_s"):
            if k in m:
                row[k] = m[k]
        row["error"] = "" if r.error is None else type(r.error).__name__
        rows.append(row)
    return rows


def write_table(rows: list[dict[str, Any]], directory: Path, stem: str) -> tuple[Path, Path]:
    import csv

    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    csv_path, md_path = directory / f"{stem}.csv", directory / f"{stem}.md"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def is_grid(space: dict[str, Any]) -> bool:
    domains = [v for v in space.values() if isinstance(v, dict) or hasattr(v, "sample")]
    return bool(domains) and all(isinstance(v, dict) and "grid_search" in v for v in domains)


def run_sweep(cfg: Any, space_name: str, *, name: str, samples: int | None = None, scheduler: str | None = None,
              search: str | None = None, log_model: bool = True) -> dict[str, Any]:
    from search_spaces import load_space

    space = load_space(space_name)
    # Tune repeats a grid num_samples times: a pure grid runs once unless asked otherwise.
    samples = samples or (1 if is_grid(space) else cfg.tune.num_samples)
    scheduler = scheduler or cfg.tune.scheduler
    search = search or cfg.tune.search
    capacity = cluster_capacity()
    check_plan(plan_for(cfg, tune=True), capacity)
    # from the autoscaler's maximum where the cluster autoscales: trials' demand scales it out
    concurrency = max_concurrent(cfg, cfg.tune.max_concurrent_trials, capacity.schedulable)
    tracking.check_reachable()
    ensure_ray()
    c = tracking.client()
    tags = run_tags(cfg, "sweep") | {"sprout.space": space_name}
    parent, resumed = tracking.get_or_create_run(c, cfg.experiment, name, run_name=name, tags=tags)
    tracking.log_params_once(c, parent, {"sweep.space": space_name, "sweep.samples": samples,
                                          "sweep.scheduler": scheduler, "sweep.search": search,
                                          "sweep.max_concurrent_trials": concurrency})
    tuner = make_tuner(cfg, name, space, samples=samples, scheduler=scheduler, search=search,
                       parent_run_id=parent, concurrency=concurrency, log_model=log_model,
                       wait_for_nodes=capacity.autoscaler)
    try:
        with watch_children(tracking.tracking_uri(), cfg.experiment, parent,
                            lambda r: epochs_from_params(r, cfg.train.epochs)):
            grid = fit_tuner(tuner)
    except BaseException as e:
        close_after(c, cfg.experiment, parent, e)
        raise
    metric = cfg.tune.metric
    rows = results_table(grid, metric)
    _finish_children(c, cfg, parent, name, rows)
    summary: dict[str, Any] = {"parent_run_id": parent, "rows": rows, "resumed": resumed}
    ok = [r for r in rows if metric in r]
    if ok:
        best = max(ok, key=lambda r: r[metric]) if cfg.tune.mode == "max" else min(ok, key=lambda r: r[metric])
        summary["best"] = best
        tracking.log_params_once(c, parent, {f"best.{k}": v for k, v in best.items() if k in space})
        c.log_metric(parent, f"best/{metric.replace('/', '_')}", float(best[metric]))
    with tempfile.TemporaryDirectory() as d:
        csv_path, md_path = write_table(rows, Path(d), "sweep_results")
        c.log_artifact(parent, str(csv_path), "report")
        c.log_artifact(parent, str(md_path), "report")
        for fig_name, fig in sensitivity_figures(rows, space, metric):
            c.log_figure(parent, fig, f"plots/{fig_name}.png")
    c.set_terminated(parent, status="FINISHED" if all(not r["error"] for r in rows) else "FAILED")
    return summary


def _finish_children(c: Any, cfg: Any, parent: str, sweep: str, rows: list[dict[str, Any]]) -> None:
    """Close the children of trials the scheduler stopped early (tagged) or that errored.

    A trial stopped by Tune leaves its MLflow run RUNNING: only this driver knows whether
    ASHA stopped it (FINISHED, ``sprout.early_stopped``) or an interrupt did (KILLED).
    """
    exp = c.get_experiment_by_name(cfg.experiment)
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000)
    by_key = {r.data.tags.get(tracking.RUN_KEY): r for r in runs}
    for row in rows:
        run = by_key.get(f"{sweep}/{row['trial_id']}")
        if run is None:
            continue
        if row["error"]:
            if run.info.status == "RUNNING":
                c.set_terminated(run.info.run_id, status="FAILED")
            if tracking.ERROR_TAG not in run.data.tags:
                c.set_tag(run.info.run_id, tracking.ERROR_TAG, row["error"])
            continue
        # the epoch it reached (its own count: Free-AT divides epochs by its replays)
        if row.get("epoch", cfg.train.epochs) < epochs_from_params(run, cfg.train.epochs):
            c.set_tag(run.info.run_id, "sprout.early_stopped", "true")
        if run.info.status != "FINISHED":
            c.set_terminated(run.info.run_id, status="FINISHED")


def sensitivity_figures(rows: list[dict[str, Any]], space: dict[str, Any], metric: str) -> list[tuple[str, Any]]:
    """Heatmaps of ``metric`` over each pair of swept numeric keys (paper Fig. 5)."""
    import itertools

    from trainables.figures import plot_sensitivity

    keys = [k for k in space if k != "method" and all(isinstance(r.get(k), (int, float)) for r in rows)]
    out = []
    for a, b in itertools.combinations(keys, 2):
        xs = sorted({r[a] for r in rows})
        ys = sorted({r[b] for r in rows})
        if len(xs) < 2 or len(ys) < 2 or len(xs) * len(ys) > 400:
            continue
        grid = [[float("nan")] * len(xs) for _ in ys]
        for r in rows:
            if metric in r:
                grid[ys.index(r[b])][xs.index(r[a])] = float(r[metric])
        out.append((f"sensitivity_{a}_{b}", plot_sensitivity(grid, ys, xs, row_label=b, col_label=a, title=metric)))
    return out
