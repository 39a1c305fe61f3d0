"""``sprout eval``: the robustness suite on a trained model, sharded over Ray tasks.

Each shard returns exact counts (``trainables.evaluation.EvalResult``); the driver sums
them (never averages of averages), logs the SPEC §5 ``test/*`` metrics, the gradient-
masking flags (tags ``masking.*`` and metrics ``masking/*``) and figures to the training
run's MLflow record (or a new run for a bare checkpoint).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from orchestrator import tracking

SHARD_CPUS = 0.5


def eval_config(cfg: Any, attacks: list[str] | None = None, n_examples: int | None = None,
                progress: bool = False) -> Any:
    from trainables.evaluation import EvalConfig

    e = cfg.eval
    return EvalConfig(
        eps=e.eps,
        pgd_step_rule="eps/5" if e.step_size_rule == "paper" else "2.5eps/steps",
        pgd_restarts=e.restarts,
        cw_l2_budgets=tuple(e.cw_l2_budgets),
        cw_l2_search_steps=e.cw_l2_search_steps,
        cw_l2_max_iter=e.cw_l2_max_iters,
        curve_eps=tuple(e.eps_curve),
        n_examples=n_examples or e.n_examples,
        seed=cfg.train.seed,
        batch_size=e.batch_size,
        progress=progress,
    )


def load_model(cfg: Any, state: dict[str, Any]) -> torch.nn.Module:
    from orchestrator.worker import build_model, data_info

    model = build_model(cfg, data_info(cfg))
    model.load_state_dict(state)
    return model.eval()


def _eval_shard(cfg_dict: dict, state: dict, source_state: dict | None, source_cfg: dict | None,
                attacks: list[str], n_examples: int | None, shard: int, num_shards: int,
                progress: bool = False) -> dict:
    from orchestrator.config import from_dict
    from orchestrator.worker import datasets
    from trainables.evaluation import run_suite

    torch.set_num_threads(1)
    cfg = from_dict(cfg_dict)
    model = load_model(cfg, state)
    source = load_model(from_dict(source_cfg), source_state) if source_state is not None else None
    test = datasets(cfg, ("test",))["test"]
    res = run_suite(model, test, attacks, eval_config(cfg, attacks, n_examples, progress), source_model=source,
                    shard=shard, num_shards=num_shards, device="cpu" if not torch.cuda.is_available() else None)
    return res.to_dict()


def evaluate_states(cfg: Any, state: dict, *, attacks: list[str], n_examples: int | None = None,
                    source: tuple[Any, dict] | None = None, num_shards: int | None = None) -> Any:
    """Run the suite over ``num_shards`` Ray tasks (1: in this process) and sum the counts."""
    from trainables.evaluation import EvalResult

    shards = num_shards or cfg.eval.num_shards
    if "transfer" in attacks and source is None:
        attacks = [a for a in attacks if a != "transfer"]
    src_state = source[1] if source else None
    src_cfg = source[0].to_dict() if source else None
    args = (cfg.to_dict(), state, src_state, src_cfg, attacks, n_examples)
    if shards == 1:
        import sys

        return EvalResult.from_dict(_eval_shard(*args, 0, 1, progress=sys.stderr.isatty()))
    import ray

    from orchestrator.session import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=SHARD_CPUS, num_gpus=0.25 if cfg.scaling.use_gpu else 0)(_eval_shard)
    refs = [task.remote(*args, i, shards) for i in range(shards)]
    return sum(EvalResult.from_dict(r) for r in ray.get(refs))


def log_evaluation(run_id: str, result: Any, *, cfg: Any, state: dict[str, Any] | None = None) -> dict[str, float]:
    """Log test metrics, masking flags and figures to ``run_id``; returns the metrics."""
    from mlflow.entities import Metric

    c = tracking.client()
    metrics = result.metrics()
    import time

    ts = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
    report = result.masking()
    flags = getattr(report, "flags", {}) or {}
    for k, v in flags.items():
        c.set_tag(run_id, f"masking.{k}", str(bool(v)).lower())
    c.set_tag(run_id, "masking.flagged", str(bool(getattr(report, "flagged", any(flags.values())))).lower())
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "evaluation.txt"
        p.write_text(result.summary() + "\n")
        c.log_artifact(run_id, str(p), "report")
    for name, fig in eval_figures(result, cfg=cfg, state=state):
        c.log_figure(run_id, fig, f"plots/{name}.png")
    return metrics


def eval_figures(result: Any, *, cfg: Any, state: dict[str, Any] | None) -> list[tuple[str, Any]]:
    from trainables import figures

    out = []
    curves = {a: result.curve(a) for a in ("pgd20", "cw_linf")}
    curves = {a: pts for a, pts in curves.items() if len(pts) > 1}
    if curves:
        out.append(("accuracy_vs_eps", figures.plot_accuracy_vs_eps(curves)))
    steps = result.steps_curve()
    if len(steps) > 1:
        out.append(("accuracy_vs_pgd_steps", figures.plot_accuracy_vs_steps({"pgd": steps}, eps=cfg.eval.eps)))
    beta = (state or {}).get("method", {}).get("beta") if state else None
    if beta is not None:
        from orchestrator.worker import data_info

        names = data_info(cfg).class_names
        out.append(("beta_correlation", figures.plot_label_correlation(beta, list(names))))
    return out


def evaluate_run(run_id: str, *, attacks: list[str] | None = None, n_examples: int | None = None,
                 num_shards: int | None = None) -> dict[str, float]:
    """``sprout eval --run-id``: the run's config and selected checkpoint, results logged back."""
    import yaml

    from orchestrator.config import ConfigError, from_dict
    from trainables.checkpoint import load_checkpoint

    c = tracking.client()
    try:
        run = c.get_run(run_id)
    except Exception as e:  # noqa: BLE001 - MLflow raises its own exception types
        raise ConfigError(f"--run-id {run_id!r}: no such MLflow run at {tracking.tracking_uri()} ({type(e).__name__})") from None
    ckpt = run.data.tags.get("sprout.selected_checkpoint")
    if not ckpt:
        raise ConfigError(f"--run-id {run_id}: the run has no selected checkpoint (tag sprout.selected_checkpoint)")
    with tempfile.TemporaryDirectory() as d:
        cfg_path = c.download_artifacts(run_id, "config.yaml", d)
        cfg = from_dict(yaml.safe_load(Path(cfg_path).read_text()))
    full = load_checkpoint(ckpt)
    attacks = attacks or list(cfg.eval.attacks)
    result = evaluate_states(cfg, full["model"], attacks=attacks, n_examples=n_examples, num_shards=num_shards)
    metrics = log_evaluation(run_id, result, cfg=cfg, state=full)
    print(result.summary())
    return metrics


def evaluate_checkpoint(path: str, cfg: Any, *, attacks: list[str] | None = None, n_examples: int | None = None,
                        num_shards: int | None = None) -> tuple[str, dict[str, float]]:
    """``sprout eval CHECKPOINT --config C``: a new MLflow run holding the evaluation."""
    from orchestrator.runner import run_tags
    from trainables.checkpoint import load_checkpoint

    full = load_checkpoint(path)
    c = tracking.client()
    exp_id = tracking.experiment_id(c, cfg.experiment)
    run = c.create_run(exp_id, tags=run_tags(cfg, "eval") | {"sprout.selected_checkpoint": str(path)},
                       run_name=f"eval-{Path(path).name}")
    tracking.log_params_once(c, run.info.run_id, cfg.flat())
    attacks = attacks or list(cfg.eval.attacks)
    result = evaluate_states(cfg, full["model"], attacks=attacks, n_examples=n_examples, num_shards=num_shards)
    metrics = log_evaluation(run.info.run_id, result, cfg=cfg, state=full)
    c.set_terminated(run.info.run_id)
    print(result.summary())
    return run.info.run_id, metrics
