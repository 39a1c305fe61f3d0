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

from orchestrator import storage, tracking
from orchestrator.config import ConfigError, apply_overrides, from_dict
from orchestrator.console import epochs_from_params, watch_children
from orchestrator.runner import ray_storage_kwargs, run_tags, storage_path
from orchestrator.session import DRIVER_CPU, check_plan, cluster_capacity, ensure_ray, plan_for
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
    # Table 7's uniform LS: SPROUT with the Dirichlet replaced by (1−α)y + α/K (same α, same start)
    "sprout_uniform_ls": {"sprout.use_gaussian": False, "sprout.use_mixup": False, "sprout.use_dirichlet": False,
                          "sprout.uniform_smoothing": True},
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


def _trial(config: dict[str, Any], base: dict[str, Any], compare: str, parent_run_id: str,
           wait_for_nodes: bool = False) -> None:
    from orchestrator.runner import run_training

    variant = config["variant"]
    overrides = {**variant_overrides(variant), **config.get("extra", {})}
    cfg = from_dict(apply_overrides(copy.deepcopy(base), list(overrides.items())))
    run_training(cfg, f"{compare}-{variant}", kind="train", parent_run_id=parent_run_id,
                 key=f"{compare}/{variant}", in_tune=True, wait_for_nodes=wait_for_nodes)


def _run_phase(cfg: Any, compare: str, phase: str, variants: list[str], parent: str,
               extra: dict[str, Any], concurrency: int, wait_for_nodes: bool = False) -> None:
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=cfg.to_dict(), compare=compare, parent_run_id=parent,
                             wait_for_nodes=wait_for_nodes), {"cpu": DRIVER_CPU}
    )
    name = f"{compare}-{phase}"
    path = storage.join(storage_path(cfg), name)  # a local path or a URI: Tune restores from both
    tune_path, tune_fs = storage.ray_storage(path)  # Tune's state through the storage layer's filesystem
    if tune.Tuner.can_restore(tune_path, storage_filesystem=tune_fs):
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_errored=True,
                                  storage_filesystem=tune_fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"variant": tune.grid_search(variants), "extra": extra},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=name, **ray_storage_kwargs(storage_path(cfg))),
        )
    with watch_children(tracking.tracking_uri(), cfg.experiment, parent,
                        lambda r: epochs_from_params(r, cfg.train.epochs)):
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
    from orchestrator.storage import load_checkpoint

    if sprout_init not in ("natural", "scratch"):
        raise ConfigError(f"--sprout-init must be 'natural' or 'scratch', got {sprout_init!r}")
    if sprout_init == "natural" and any(_is_sprout(m) for m in methods) and "natural" not in methods:
        methods = ["natural", *methods]
    if "transfer" in (attacks or cfg.eval.attacks) and "natural" not in methods and not cfg.eval.transfer_source:
        raise ConfigError("eval.attacks includes 'transfer': add natural to --methods (the default source) "
                          "or set eval.transfer_source to a run id or checkpoint")
    # Cost columns must be measured without trials competing for the same cores: on CPU the
    # methods run one at a time unless tune.max_concurrent_trials says otherwise.
    requested = cfg.tune.max_concurrent_trials or (None if cfg.scaling.use_gpu else 1)
    capacity = cluster_capacity()
    check_plan(plan_for(cfg, tune=True), capacity)
    concurrency = max_concurrent(cfg, requested, capacity.schedulable)
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
        _run_phase(cfg, name, "phase1", first, parent, {}, concurrency, capacity.autoscaler)
        extra: dict[str, Any] = {}
        if second:
            natural = child_runs(c, cfg, parent, name)["natural"]
            extra = {"train.init_from": natural.data.tags["sprout.selected_checkpoint"]}
            _run_phase(cfg, name, "phase2", second, parent, extra, concurrency, capacity.autoscaler)
        children = child_runs(c, cfg, parent, name)
        states = {m: load_checkpoint(children[m].data.tags["sprout.selected_checkpoint"]) for m in methods}
        # transfer examples are crafted on this comparison's natural model (SPEC §3)
        src = {"eval.transfer_source": children["natural"].info.run_id} if "natural" in children else {}
        cfgs = {m: _variant_cfg(cfg, m, {**(extra if m in second else {}), **src}) for m in methods}
        results = _evaluate_all(cfg, cfgs, states, attacks or list(cfg.eval.attacks), n_examples)
        from orchestrator.evaluate import log_evaluation

        for m in methods:
            log_evaluation(children[m].info.run_id, results[m], cfg=cfgs[m], state=states[m])
        rows = comparison_rows(c, {m: children[m].info.run_id for m in methods}, results, cfgs)
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
    """Every method's suite, all at once, as Ray tasks on worker resources; transfer examples
    come from the natural model (or an explicit eval.transfer_source)."""
    from orchestrator.evaluate import EvalJob, evaluate_jobs

    source = None
    if "transfer" in attacks:
        if "natural" in states:
            source = (cfgs["natural"], states["natural"]["model"])
        else:  # an explicit eval.transfer_source (run_compare checked that there is one)
            from orchestrator.evaluate import resolve_transfer_source

            source = resolve_transfer_source(cfg)
    # natural's own transfer row is its white-box PGD (source = target): kept so every row is filled
    jobs = {m: EvalJob(cfgs[m], state["model"], list(attacks), source) for m, state in states.items()}
    return evaluate_jobs(jobs, n_examples=n_examples)


def _history_median(c: Any, run_id: str, key: str) -> float:
    """Median over epochs: robust to the first epoch's warm-up and to stray slow epochs."""
    import statistics

    hist = c.get_metric_history(run_id, key)
    return statistics.median(m.value for m in hist) if hist else float("nan")


def comparison_rows(c: Any, run_ids: dict[str, str], results: dict[str, Any],
                    cfgs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    from orchestrator.config import checkpoint_metric

    rows = []
    for m, run_id in run_ids.items():
        run = c.get_run(run_id)
        metrics = results[m].metrics()
        report = results[m].masking()
        row: dict[str, Any] = {"method": m}
        if cfgs is not None and m in cfgs:
            # what makes rows comparable, stated per row: the training augmentation and the
            # validation metric the reported checkpoint was selected by
            row["augment"] = cfgs[m].data.augment
            row["selected_by"] = checkpoint_metric(cfgs[m])
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
    keys = ["method", *[k for k in ("augment", "selected_by") if any(k in r for r in rows)], "test/clean_acc"]
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


def console_table(rows: list[dict[str, Any]], cfg: Any) -> str:
    """The comparison as the terminal shows it: aligned, every column naming its attack and
    budget or unit, rows ranked by the strongest robust metric, masking flags in words."""
    e = cfg.eval
    eps = f"ε={e.eps:g}"
    cols: list[tuple[str, str, str]] = [  # (row key, header, format)
        ("method", "method", "s"), ("test/clean_acc", "clean", ".3f"),
        ("test/autoattack_acc", f"AutoAttack ε={getattr(e, 'autoattack_eps', e.eps):.3g}", ".3f"),
        ("test/pgd20_acc", f"PGD-20 {eps}", ".3f"), ("test/pgd100_acc", f"PGD-100 {eps}", ".3f"),
        ("test/cw_linf_acc", f"C&W-ℓ∞ {eps}", ".3f"), ("test/cw_l2_acc", "C&W-ℓ2", ".3f"),
        ("test/transfer_acc", f"transfer from natural {eps}", ".3f"), ("test/rotation_acc", "rotation 10°", ".3f"),
        ("test/brightness_acc", "brightness ×1.5", ".3f"), ("test/contrast_acc", "contrast ×2", ".3f"),
        ("test/gray_acc", "gray", ".3f"), ("time/epoch_s", "s/epoch", ".2f"), ("images_per_s", "images/s", ".0f"),
        ("time/accelerator_hours", "accel-hours", ".4f"), ("epoch_time_vs_sprout", "epoch time / SPROUT", ".2f"),
    ]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    rk = robust_key(rows)
    ranked = sorted(rows, key=lambda r: -float(r.get(rk, 0.0))) if rk else list(rows)

    def cell(r: dict[str, Any], key: str, f: str) -> str:
        v = r.get(key, "")
        return format(v, f) if isinstance(v, float) and not math.isnan(v) else ("-" if v in ("", None) else str(v))

    table = [[h for _, h, _ in cols]] + [[cell(r, k, f) for k, _, f in cols] for r in ranked]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if rk:
        header = next(h for k, h, _ in cols if k == rk)
        lines.append(f"ranking by {header}: " + " > ".join(f"{r['method']} {float(r[rk]):.3f}" for r in ranked))
    flagged = [r["method"] for r in rows if r.get("masking_flagged")]
    lines.append("gradient masking: " + (f"suspected for {', '.join(flagged)} (a black-box or transfer attack, or a "
                                           "large ε, did better than expected; see each run's report/evaluation.txt)"
                                           if flagged else "no check flagged any model"))
    return "\n".join(lines)


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
