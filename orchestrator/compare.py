"""``sprout compare``: every method on the same model, data and hardware, side by side.

Methods run as Ray Tune trials (each a Ray Train run) under one MLflow parent run
(``sprout_kind=compare``). SPROUT and its ablations start from the natural model's
selected checkpoint by default, as in the paper, so they run in a second phase. Every
model is then evaluated with the same suite (transfer examples crafted on the natural
model), and the parent gets ``report/comparison.{md,csv}`` with accuracy, robustness,
masking flags and cost (epoch time, images/s, accelerator-hours, ratios vs natural and
vs SPROUT as in the paper's Table 6), a radar chart (Fig. 1) and a cost/robustness plot.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.config import ConfigError, apply_overrides, from_dict
from orchestrator.runner import run_tags, storage_path
from orchestrator.session import DRIVER_CPU, available_resources, ensure_ray
from orchestrator.sweep import max_concurrent, write_table
from orchestrator.tune_fit import close_after, fit_tuner
from trainables import METHODS

# Table 7 ablations: SPROUT with its parts switched off.
ABLATIONS: dict[str, dict[str, Any]] = {
    "sprout_ga": {"sprout.use_mixup": False, "sprout.use_dirichlet": False},
    "sprout_mixup": {"sprout.use_gaussian": False, "sprout.use_dirichlet": False},
    "sprout_dirichlet": {"sprout.use_gaussian": False, "sprout.use_mixup": False},
    "sprout_ga_mixup": {"sprout.use_dirichlet": False},
    "sprout_mixup_dirichlet": {"sprout.use_gaussian": False},
    "sprout_ga_dirichlet": {"sprout.use_mixup": False},
}
DEFAULT_METHODS = ("natural", "pgd_at", "trades", "sprout")
ROBUST_KEY_ORDER = ("test/autoattack_acc", "test/pgd20_acc", "test/pgd100_acc", "test/cw_linf_acc")


def variant_overrides(variant: str) -> dict[str, Any]:
    if variant in METHODS:
        return {"method": variant}
    if variant in ABLATIONS:
        return {"method": "sprout", **ABLATIONS[variant]}
    allowed = ", ".join([*METHODS, *ABLATIONS])
    raise ConfigError(f"--methods: unknown method {variant!r}; expected some of: {allowed}")


def parse_methods(text: str | None) -> list[str]:
    methods = [m.strip() for m in (text or ",".join(DEFAULT_METHODS)).split(",") if m.strip()]
    if not methods:
        raise ConfigError("--methods: give at least one method")
    for m in methods:
        variant_overrides(m)
    return list(dict.fromkeys(methods))


def _is_sprout(variant: str) -> bool:
    return variant_overrides(variant)["method"] == "sprout"


def _trial(config: dict[str, Any], base: dict[str, Any], compare: str, parent_run_id: str) -> None:
    from orchestrator.runner import run_training

    variant = config["variant"]
    overrides = {**variant_overrides(variant), **config.get("extra", {})}
    cfg = from_dict(apply_overrides(copy.deepcopy(base), list(overrides.items())))
    run_training(cfg, f"{compare}-{variant}", kind="train", parent_run_id=parent_run_id,
                 key=f"{compare}/{variant}", in_tune=True)


def _run_phase(cfg: Any, compare: str, phase: str, variants: list[str], parent: str,
               extra: dict[str, Any], concurrency: int) -> None:
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=cfg.to_dict(), compare=compare, parent_run_id=parent), {"cpu": DRIVER_CPU}
    )
    name = f"{compare}-{phase}"
    path = Path(storage_path(cfg)) / name
    if "://" not in storage_path(cfg) and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"variant": tune.grid_search(variants), "extra": extra},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=name, storage_path=storage_path(cfg)),
        )
    grid = fit_tuner(tuner)
    failed = [r for r in grid if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} trial(s) of {name} failed: {failed[0].error}")


def child_runs(c: Any, cfg: Any, parent: str, compare: str) -> dict[str, Any]:
    exp = c.get_experiment_by_name(cfg.experiment)
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000)
    prefix = f"{compare}/"
    return {r.data.tags[tracking.RUN_KEY][len(prefix):]: r for r in runs
            if r.data.tags.get(tracking.RUN_KEY, "").startswith(prefix)}


def _variant_cfg(cfg: Any, variant: str, extra: dict[str, Any]) -> Any:
    return from_dict(apply_overrides(cfg.to_dict(), list({**variant_overrides(variant), **extra}.items())))


def run_compare(cfg: Any, methods: list[str], *, name: str, sprout_init: str = "natural",
                attacks: list[str] | None = None, n_examples: int | None = None) -> dict[str, Any]:
    from trainables.checkpoint import load_checkpoint

    if sprout_init not in ("natural", "scratch"):
        raise ConfigError(f"--sprout-init must be 'natural' or 'scratch', got {sprout_init!r}")
    if sprout_init == "natural" and any(_is_sprout(m) for m in methods) and "natural" not in methods:
        methods = ["natural", *methods]
    # Cost columns must be measured without trials competing for the same cores: on CPU the
    # methods run one at a time unless tune.max_concurrent_trials says otherwise.
    requested = cfg.tune.max_concurrent_trials or (None if cfg.scaling.use_gpu else 1)
    concurrency = max_concurrent(cfg, requested, available_resources())
    tracking.check_reachable()
    ensure_ray()
    c = tracking.client()
    parent, _ = tracking.get_or_create_run(
        c, cfg.experiment, name, run_name=name, tags=run_tags(cfg, "compare") | {"method": "compare"}
    )
    tracking.log_params_once(c, parent, {**cfg.flat(), "compare.methods": ",".join(methods),
                                          "compare.sprout_init": sprout_init})
    t0 = time.perf_counter()
    try:
        first = [m for m in methods if not (_is_sprout(m) and sprout_init == "natural")]
        second = [m for m in methods if m not in first]
        _run_phase(cfg, name, "phase1", first, parent, {}, concurrency)
        extra: dict[str, Any] = {}
        if second:
            natural = child_runs(c, cfg, parent, name)["natural"]
            extra = {"train.init_from": natural.data.tags["sprout.selected_checkpoint"]}
            _run_phase(cfg, name, "phase2", second, parent, extra, concurrency)
        children = child_runs(c, cfg, parent, name)
        states = {m: load_checkpoint(children[m].data.tags["sprout.selected_checkpoint"]) for m in methods}
        cfgs = {m: _variant_cfg(cfg, m, extra if m in second else {}) for m in methods}
        results = _evaluate_all(cfg, cfgs, states, attacks or list(cfg.eval.attacks), n_examples)
        from orchestrator.evaluate import log_evaluation

        for m in methods:
            log_evaluation(children[m].info.run_id, results[m], cfg=cfgs[m], state=states[m])
        rows = comparison_rows(c, {m: children[m].info.run_id for m in methods}, results)
        _log_report(c, parent, rows)
        _log_model_figures(c, parent, cfgs, states)
    except BaseException as e:
        close_after(c, cfg.experiment, parent, e)
        raise
    c.log_metric(parent, "time/compare_total_s", time.perf_counter() - t0)
    c.set_terminated(parent, status="FINISHED")
    return {"parent_run_id": parent, "rows": rows}


def _evaluate_all(cfg: Any, cfgs: dict[str, Any], states: dict[str, Any], attacks: list[str],
                  n_examples: int | None) -> dict[str, Any]:
    """Evaluate every method in parallel Ray tasks; transfer examples come from natural."""
    import ray

    from orchestrator.evaluate import SHARD_CPUS, _eval_shard
    from trainables.evaluation import EvalResult

    source = states.get("natural")
    task = ray.remote(num_cpus=SHARD_CPUS)(_eval_shard)
    refs = {}
    for m, state in states.items():
        # natural's own transfer row is its white-box PGD (source = target): kept so every row is filled
        atk = [a for a in attacks if a != "transfer" or source is not None]
        refs[m] = task.remote(cfgs[m].to_dict(), state["model"], source["model"] if source and "transfer" in atk else None,
                              cfgs["natural"].to_dict() if source and "transfer" in atk else None, atk, n_examples, 0, 1)
    return {m: EvalResult.from_dict(ray.get(r)) for m, r in refs.items()}


def _history_median(c: Any, run_id: str, key: str) -> float:
    """Median over epochs: robust to the first epoch's warm-up and to stray slow epochs."""
    import statistics

    hist = c.get_metric_history(run_id, key)
    return statistics.median(m.value for m in hist) if hist else float("nan")


def comparison_rows(c: Any, run_ids: dict[str, str], results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for m, run_id in run_ids.items():
        run = c.get_run(run_id)
        metrics = results[m].metrics()
        report = results[m].masking()
        row: dict[str, Any] = {"method": m}
        row.update({k: v for k, v in sorted(metrics.items()) if k.startswith("test/")})
        row["masking_flagged"] = bool(getattr(report, "flagged", False))
        row["time/epoch_s"] = _history_median(c, run_id, "time/epoch_s")
        row["images_per_s"] = _history_median(c, run_id, "time/samples_per_s")
        row["time/train_total_s"] = run.data.metrics.get("time/train_total_s", float("nan"))
        row["time/accelerator_hours"] = run.data.metrics.get("time/accelerator_hours", float("nan"))
        row["run_id"] = run_id
        rows.append(row)
    ref = {r["method"]: r["time/epoch_s"] for r in rows}
    for r in rows:
        for base in ("natural", "sprout"):
            d = ref.get(base)
            r[f"epoch_time_vs_{base}"] = r["time/epoch_s"] / d if d and not math.isnan(d) else float("nan")
    return rows


def robust_key(rows: list[dict[str, Any]]) -> str | None:
    for k in ROBUST_KEY_ORDER:
        if all(k in r for r in rows):
            return k
    return None


def format_table(rows: list[dict[str, Any]]) -> str:
    keys = ["method", "test/clean_acc"]
    rk = robust_key(rows)
    keys += [k for k in (*ROBUST_KEY_ORDER, "test/cw_l2_acc", "test/transfer_acc", "test/rotation_acc",
                         "test/brightness_acc", "test/contrast_acc", "test/gray_acc") if any(k in r for r in rows)]
    keys += ["masking_flagged", "time/epoch_s", "images_per_s", "time/accelerator_hours", "epoch_time_vs_natural",
             "epoch_time_vs_sprout"]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    note = f"\nrobustness ranked by {rk}" if rk else ""
    return "\n".join(lines) + note


def _log_report(c: Any, parent: str, rows: list[dict[str, Any]]) -> None:
    from trainables import figures

    with tempfile.TemporaryDirectory() as d:
        csv_path, md_path = write_table(rows, Path(d), "comparison")
        md_path.write_text("# Method comparison\n\n" + format_table(rows) + "\n\n## All columns\n\n" + md_path.read_text())
        c.log_artifact(parent, str(csv_path), "report")
        c.log_artifact(parent, str(md_path), "report")
    rk = robust_key(rows)
    axes = {"clean": "test/clean_acc"}
    if rk:
        axes["robust"] = rk
    for k, label in (("test/cw_l2_acc", "C&W-l2"), ("test/transfer_acc", "transfer"), ("test/rotation_acc", "rotation")):
        if all(k in r for r in rows):
            axes[label] = k
    scores = {r["method"]: {label: float(r[k]) for label, k in axes.items()} for r in rows}
    for r in rows:
        t = r["time/epoch_s"]
        if t and not math.isnan(t):
            scores[r["method"]]["epoch time"] = t
    fig = figures.plot_radar(scores, lower_is_better=("epoch time",))
    c.log_figure(parent, fig, "plots/radar.png")
    if rk:
        c.log_figure(parent, pareto_plot(rows, rk), "plots/robustness_vs_cost.png")


def _log_model_figures(c: Any, parent: str, cfgs: dict[str, Any], states: dict[str, Any], n: int = 64) -> None:
    """Loss landscapes (paper Fig. 2) and pairwise input-gradient cosine similarity (Table 11)."""
    import torch

    from orchestrator.evaluate import load_model
    from orchestrator.worker import datasets
    from trainables import figures
    from trainables.evaluation import example_indices

    first = next(iter(cfgs.values()))
    test = datasets(first, ("test",))["test"]
    idx = example_indices(len(test), n, first.train.seed)
    x = torch.stack([test[int(i)][0] for i in idx])
    y = torch.tensor([test[int(i)][1] for i in idx])
    models = {m: load_model(cfgs[m], states[m]["model"]) for m in cfgs}
    names, sim = figures.input_gradient_cosine(models, x, y)
    c.log_figure(parent, figures.plot_gradient_similarity(names, sim), "plots/input_gradient_cosine.png")
    radius = 2 * first.eval.eps
    grids = {m: figures.loss_landscape_grid(model, x, y, radius=radius, n=11, seed=first.train.seed)
             for m, model in models.items()}
    c.log_figure(parent, figures.plot_loss_landscape(grids, title=f"Loss landscape (radius {radius:g})"),
                 "plots/loss_landscape.png")


def pareto_plot(rows: list[dict[str, Any]], robust: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in rows:
        ax.scatter(r["time/epoch_s"], r[robust], s=60)
        ax.annotate(r["method"], (r["time/epoch_s"], r[robust]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("seconds per epoch (same hardware)")
    ax.set_ylabel(robust)
    ax.set_title("Robust accuracy vs training cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
