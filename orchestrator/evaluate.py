"""``sprout eval``: the robustness suite on a trained model, sharded over Ray tasks.

Each shard returns exact counts (``trainables.evaluation.EvalResult``); the driver sums
them (never averages of averages), logs the SPEC §5 ``test/*`` metrics, the gradient-
masking flags (tags ``masking.*`` and metrics ``masking/*``) and figures to the training
run's MLflow record (or a new run for a bare checkpoint).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator import tracking
from orchestrator.console import console
from trainables.evaluation import EvalResult


def eval_config(cfg: Any, attacks: list[str] | None = None, n_examples: int | None = None,
                progress: bool = False) -> Any:
    from trainables.evaluation import EvalConfig

    e = cfg.eval
    return EvalConfig(
        eps=e.eps,
        autoattack_eps=e.autoattack_eps,
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


def shard_options(cfg: Any) -> dict[str, Any]:
    """Ray task options of one evaluation shard: a training worker's resources (its GPU when
    ``scaling.use_gpu``, its accelerator type), so shards run where training ran, not on the head."""
    sc = cfg.scaling
    opts: dict[str, Any] = {"num_cpus": sc.cpus_per_worker, "num_gpus": sc.gpus_per_worker if sc.use_gpu else 0}
    if sc.accelerator_type:
        opts["accelerator_type"] = sc.accelerator_type
    return opts


def _eval_shard(cfg_dict: dict, state: dict, source_state: dict | None, source_cfg: dict | None,
                attacks: list[str], n_examples: int | None, shard: int, num_shards: int,
                progress: Any = None, key: str = "") -> dict:
    """One shard of the suite, in a Ray task on a worker node: exact counts and where it ran."""
    import ray

    from orchestrator.config import from_dict
    from orchestrator.worker import datasets
    from trainables.evaluation import run_suite

    cfg = from_dict(cfg_dict)
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    torch.set_num_threads(max(1, round(cfg.scaling.cpus_per_worker)))
    model = load_model(cfg, state)
    source = load_model(from_dict(source_cfg), source_state) if source_state is not None else None
    test = datasets(cfg, ("test",))["test"]

    def on_attack(attack: str, done: int, total: int) -> None:
        if progress is not None:
            progress.update.remote(key, shard, attack, done, total)

    res = run_suite(model, test, attacks, eval_config(cfg, attacks, n_examples), source_model=source,
                    shard=shard, num_shards=num_shards, device="cuda" if use_gpu else "cpu", on_attack=on_attack)
    return {"result": res.to_dict(), "node_id": ray.get_runtime_context().get_node_id()}


def resolve_transfer_source(cfg: Any) -> tuple[Any, dict]:
    """(config, model state) of eval.transfer_source: an MLflow run id (its config.yaml and
    selected checkpoint) or a checkpoint path (a model of the evaluated config's architecture)."""
    import yaml

    from orchestrator.config import ConfigError, from_dict, require_transfer_source

    require_transfer_source(cfg, ["transfer"])
    src = cfg.eval.transfer_source
    if "://" in src or Path(src).expanduser().exists():
        return cfg, _load_checkpoint(src)["model"]
    c = tracking.client()
    try:
        run = c.get_run(src)
    except Exception as e:  # noqa: BLE001 - MLflow raises its own exception types
        raise ConfigError(f"eval.transfer_source {src!r}: neither a checkpoint path nor an MLflow run at "
                          f"{tracking.tracking_uri()} ({type(e).__name__})") from None
    ckpt = run.data.tags.get("sprout.selected_checkpoint")
    if not ckpt:
        raise ConfigError(f"eval.transfer_source {src!r}: the run has no selected checkpoint (tag sprout.selected_checkpoint)")
    with tempfile.TemporaryDirectory() as d:
        src_cfg = from_dict(yaml.safe_load(Path(c.download_artifacts(src, "config.yaml", d)).read_text()))
    return src_cfg, _load_checkpoint(ckpt)["model"]


def _load_checkpoint(path: str) -> dict:
    from orchestrator.storage import load_checkpoint

    return load_checkpoint(path)


@dataclass
class ShardedResult(EvalResult):
    """The summed counts of an evaluation, plus the Ray nodes its shards ran on."""

    node_ids: list[str] = field(default_factory=list)


@dataclass
class EvalJob:
    """One model to evaluate: its config, model state, attacks and transfer source (cfg, state)."""

    cfg: Any
    state: dict
    attacks: list[str]
    source: tuple[Any, dict] | None = None


class _Progress:
    """Blocks done per (model, shard, attack), reported by the shards while they run."""

    def __init__(self) -> None:
        self.done: dict[tuple[str, int, str], tuple[int, int]] = {}

    def update(self, key: str, shard: int, attack: str, done: int, total: int) -> None:
        self.done[(key, shard, attack)] = (done, total)

    def snapshot(self) -> dict[tuple[str, int, str], tuple[int, int]]:
        return dict(self.done)


class _EvalView:
    """The evaluation on the console: on a terminal one bar per model (blocks × attacks done,
    the attack now running); otherwise one line per attack as it finishes on every shard."""

    def __init__(self, jobs: dict[str, EvalJob], n_shards: dict[str, int], tty: bool) -> None:
        import time

        self.attacks = {k: ["clean", *[a for a in dict.fromkeys(j.attacks) if a != "clean"]] for k, j in jobs.items()}
        self.n_shards, self.tty, self.t0 = n_shards, tty, time.perf_counter()
        self.said: set[tuple[str, str]] = set()
        self.bars: dict[str, Any] = {}
        if tty:
            from tqdm.auto import tqdm

            self.width = max(len(k) for k in jobs)
            # before any shard reports, each bar names its first attack, as it does from then on
            self.bars = {k: tqdm(total=1, desc=self._desc(k, self.attacks[k][0]), position=i, leave=False,
                                 dynamic_ncols=True, file=console.err, bar_format="{desc} {bar:12} {percentage:3.0f}%")
                         for i, k in enumerate(jobs)}

    def _desc(self, key: str, running: str | None) -> str:
        names = self.attacks[key]
        what = f"{running} ({names.index(running) + 1}/{len(names)})" if running else "done"
        return f"eval {key:<{self.width}}  {what:<{max(len(a) for a in names) + 6}}"

    def update(self, snap: dict[tuple[str, int, str], tuple[int, int]], finished: set[str]) -> None:
        import time

        for key, names in self.attacks.items():
            per = {a: [snap.get((key, s, a)) for s in range(self.n_shards[key])] for a in names}
            done = [a for a in names if key in finished or all(p is not None and p[0] >= p[1] for p in per[a])]
            if self.tty:
                bar = self.bars[key]
                blocks = [p for ps in per.values() for p in ps if p is not None]
                total = max(max((p[1] for p in blocks), default=1) * len(names) * self.n_shards[key], 1)
                bar.total = total
                bar.n = total if key in finished else min(sum(p[0] for p in blocks), total)
                bar.set_description_str(self._desc(key, None if key in finished else self._running(snap, key)))
                bar.refresh()
            else:
                for a in done:
                    if a != "clean" and (key, a) not in self.said:
                        self.said.add((key, a))
                        console.say(f"eval {key}: {a} done ({time.perf_counter() - self.t0:.0f} s)")

    def _running(self, snap: dict[tuple[str, int, str], tuple[int, int]], key: str) -> str:
        """The attack the slowest shard of ``key`` is on: the suite runs every attack on a block
        before the next block, so a shard with ``u`` attack-blocks done is on attack ``u mod A``."""
        names = self.attacks[key]
        units = min(sum((snap.get((key, s, a)) or (0, 0))[0] for a in names) for s in range(self.n_shards[key]))
        return names[units % len(names)]

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def evaluate_jobs(jobs: dict[str, EvalJob], *, n_examples: int | None = None,
                  num_shards: int | None = None) -> dict[str, ShardedResult]:
    """Every job's suite as Ray tasks with training workers' resources (never in this driver,
    which on a cluster is the CPU head), ``num_shards`` per model (default ``eval.num_shards``,
    else as many as training workers); counts are summed, never averaged."""

    import ray

    from orchestrator.session import ensure_ray

    ensure_ray()
    progress = ray.remote(num_cpus=0)(_Progress).remote()
    refs: dict[Any, str] = {}
    n_shards: dict[str, int] = {}
    shared: dict[int, Any] = {}  # one object-store copy of a source model used by every job
    for key, job in jobs.items():
        shards = n_shards[key] = num_shards or job.cfg.eval.num_shards or job.cfg.scaling.num_workers
        task = ray.remote(**shard_options(job.cfg))(_eval_shard)
        state_ref = ray.put(job.state)
        src_cfg = src_ref = None
        if job.source is not None:
            src_cfg = job.source[0].to_dict()
            src_ref = shared.setdefault(id(job.source[1]), ray.put(job.source[1]))
        for i in range(shards):
            ref = task.remote(job.cfg.to_dict(), state_ref, src_ref, src_cfg, job.attacks, n_examples, i, shards,
                              progress, key)
            refs[ref] = key
    parts: dict[str, list[dict]] = {k: [] for k in jobs}
    view = _EvalView(jobs, n_shards, console.tty)
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in ready:
                parts[refs[ref]].append(ray.get(ref))
            # a model whose shards have all returned is done, whatever progress reports are still in flight
            view.update(ray.get(progress.snapshot.remote()), {k for k, v in parts.items() if len(v) == n_shards[k]})
    finally:
        view.close()
        ray.kill(progress)
    out = {}
    for key, got in parts.items():
        total = sum(EvalResult.from_dict(g["result"]) for g in got)
        out[key] = ShardedResult(**total.to_dict(), node_ids=sorted({g["node_id"] for g in got}))
    return out


def evaluate_states(cfg: Any, state: dict, *, attacks: list[str], n_examples: int | None = None,
                    source: tuple[Any, dict] | None = None, num_shards: int | None = None,
                    label: str = "model") -> ShardedResult:
    """The suite on one model, sharded over Ray tasks (see :func:`evaluate_jobs`)."""
    if "transfer" in attacks and source is None:
        source = resolve_transfer_source(cfg)  # never a silent drop: no source is a ConfigError
    return evaluate_jobs({label: EvalJob(cfg, state, list(attacks), source)}, n_examples=n_examples,
                         num_shards=num_shards)[label]


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
    if getattr(result, "node_ids", None):
        c.set_tag(run_id, "sprout.eval_nodes", ",".join(result.node_ids))  # where the shards ran
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
    from orchestrator.storage import load_checkpoint

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
    console.out(result.summary())
    return metrics


def evaluate_checkpoint(path: str, cfg: Any, *, attacks: list[str] | None = None, n_examples: int | None = None,
                        num_shards: int | None = None) -> tuple[str, dict[str, float]]:
    """``sprout eval CHECKPOINT --config C``: a new MLflow run holding the evaluation."""
    from orchestrator.config import require_transfer_source
    from orchestrator.runner import run_tags
    from orchestrator.storage import load_checkpoint

    require_transfer_source(cfg, attacks or list(cfg.eval.attacks))  # before any run is created
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
    console.out(result.summary())
    return run.info.run_id, metrics
