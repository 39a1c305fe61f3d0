"""Epoch time under Ray Train (``TorchTrainer``, 1 worker) vs the bare core loop (SPEC §8, issue 3).

Both paths do the same work: ``orchestrator.worker.build_run`` builds model, method,
optimizer and loaders from the same resolved config, and ``trainables.loop.train_epoch``
runs each epoch with the same ``step_options``, the same per-epoch learning rate
(``lr_at``) and the same torch thread count (the Ray worker sets
``torch.set_num_threads(max(1, round(scaling.cpus_per_worker)))``; here
``scaling.cpus_per_worker=1`` and the bare loop uses 1 thread too).

- **Ray**: ``orchestrator.runner.run_training`` (exactly what ``sprout train`` does, minus the
  final ``mlflow.pytorch.log_model``) into a temporary MLflow store
  (``MLFLOW_TRACKING_URI=sqlite:///<tmp>/m.db``) and a temporary storage path. The epoch time
  is the worker's own ``time/epoch_s`` (``perf_counter`` around ``train_epoch`` plus the
  world-size-1 all-reduce of the epoch sums), read back from the MLflow metric history.
- **bare**: ``build_run`` + ``train_epoch`` in this process, ``perf_counter`` around
  ``train_epoch``.

The first epoch of every run is warm-up and is excluded; the figure is the median over the
remaining epochs of all runs. Bare and Ray runs alternate (rotated order per round) so load
drift on a shared machine hits both alike; the "paired" ratio is the median over rounds of
each round's Ray median / bare median. Process and thread CPU seconds of ``train_epoch`` are
recorded too (in the Ray worker through a thin wrapper around ``trainables.loop.train_epoch``
installed before ``train_loop_per_worker`` runs; it adds three clock reads per epoch,
``--no-cpu-probe`` turns it off). Thread CPU is the training thread's own work (1 torch
thread: all compute runs on it); process CPU adds every other thread of the process (Ray's
core-worker threads in the worker, the driver's in the bare process).

The whole-run wall time (``run_training``: MLflow run, trainer and worker start-up, epochs,
per-epoch validation and checkpoint, shutdown) and ``ray.init`` are reported separately: a
fixed start-up cost, not the target.

    python benchmarks/ray_overhead.py                       # digits small_cnn and VGG-16 32×32
    python benchmarks/ray_overhead.py --workloads digits --rounds 3 --epochs 6 --json ray_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET = 1.05  # SPEC §8: Ray Train (1 worker) epoch time / the same loop without Ray
ROOT = Path(__file__).resolve().parents[1]

# Overrides on top of configs/digits.yaml per workload (``--set`` adds to all of them).
WORKLOADS: dict[str, list[str]] = {
    "digits": [],
    "vgg16": ["model.name=vgg16", "data.name=synthetic", "data.image_size=32", "data.channels=3",
              "data.num_classes=10", "data.batch_size=32"],
}
COMMON = [
    "eval.attacks=[]", "scaling.num_workers=1", "scaling.cpus_per_worker=1", "scaling.use_gpu=false",
    "train.val_pgd_steps=0", "train.max_failures=0", "train.checkpoint_keep=1", "experiment=ray-overhead",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"))
    ap.add_argument("--workloads", default="digits,vgg16", help=f"comma-separated: {', '.join(WORKLOADS)}")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every workload (repeatable)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs per run, the first is warm-up (default: 6 digits, 4 vgg16)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one bare and one Ray run each)")
    ap.add_argument("--vgg-samples", type=int, default=192,
                    help="synthetic training images for vgg16 (an epoch of a few seconds on 1 CPU thread)")
    ap.add_argument("--no-cpu-probe", action="store_true", help="do not wrap train_epoch in the Ray worker")
    ap.add_argument("--keep", metavar="DIR", help="use DIR for the MLflow store and storage (default: a temp dir)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    return ap.parse_args(argv)


def workload_overrides(name: str, args: argparse.Namespace, storage: str) -> list[str]:
    epochs = args.epochs or (6 if name == "digits" else 4)
    extra = [f"data.num_samples={args.vgg_samples}"] if name == "vgg16" else []
    return WORKLOADS[name] + extra + COMMON + [f"train.epochs={epochs}", f"storage.path={storage}"] + args.overrides


def _clocks() -> tuple[float, float, float]:
    return time.perf_counter(), time.process_time(), time.thread_time()


def bare_run(cfg: Any) -> dict[str, Any]:
    """build_run + train_epoch in this process, as the Ray worker does them (1 thread)."""
    import torch

    from orchestrator.worker import build_run, step_options
    from trainables.loop import lr_at, train_epoch

    torch.set_num_threads(max(1, round(cfg.scaling.cpus_per_worker)))
    t_run = time.perf_counter()
    device = torch.device("cpu")
    run = build_run(cfg, rank=0, world=1, device=device)
    opts = step_options(cfg, device)
    epochs = []
    for epoch in range(run.epochs):
        for g in run.optimizer.param_groups:
            g["lr"] = lr_at(epoch, run.epochs, run.optim)
        w, c, t = _clocks()
        train_epoch(run.model, run.method, run.optimizer, run.train_loader, device, epoch=epoch,
                    seed=cfg.train.seed, rank=0, opts=opts, max_steps=cfg.train.max_steps_per_epoch)
        w2, c2, t2 = _clocks()
        epochs.append({"epoch": epoch + 1, "wall_s": w2 - w, "cpu_s": c2 - c, "thread_cpu_s": t2 - t})
    return {"epochs": epochs, "run_wall_s": time.perf_counter() - t_run, "threads": torch.get_num_threads(),
            "steps_per_epoch": len(run.train_loader), "train_samples": len(run.train_loader.dataset)}


def _timed_worker_loop(original: Any, probe_dir: str) -> Any:
    """A train_loop_per_worker that records train_epoch's CPU time, then runs the original."""

    def loop(config: dict[str, Any]) -> None:
        import json as _json
        import os as _os
        import time as _time

        import trainables.loop as core

        inner = core.train_epoch
        rows: list[dict[str, float]] = []

        def train_epoch(*a: Any, **k: Any) -> Any:
            w, c, t = _time.perf_counter(), _time.process_time(), _time.thread_time()
            out = inner(*a, **k)
            rows.append({"epoch": k.get("epoch", -1) + 1, "wall_s": _time.perf_counter() - w,
                         "cpu_s": _time.process_time() - c, "thread_cpu_s": _time.thread_time() - t})
            return out

        core.train_epoch = train_epoch  # train_loop_per_worker imports it at call time
        try:
            original(config)
        finally:
            core.train_epoch = inner
            path = _os.path.join(probe_dir, f"{config.get('name', 'run')}.json")
            with open(path, "w") as f:
                _json.dump({"pid": _os.getpid(), "epochs": rows}, f)

    return loop


def ray_run(cfg: Any, name: str, probe_dir: str | None) -> dict[str, Any]:
    import orchestrator.ray_train as rt
    from orchestrator import tracking
    from orchestrator.runner import run_training

    original = rt.train_loop_per_worker
    if probe_dir is not None:
        rt.train_loop_per_worker = _timed_worker_loop(original, probe_dir)  # fit_trainer imports it at call time
    try:
        t0 = time.perf_counter()
        out = run_training(cfg, name, log_model=False)
        wall = time.perf_counter() - t0
    finally:
        rt.train_loop_per_worker = original
    hist = tracking.client().get_metric_history(out.run_id, "time/epoch_s")
    by_step = {m.step: m.value for m in hist}
    probe: dict[int, dict[str, float]] = {}
    if probe_dir is not None and (p := Path(probe_dir) / f"{name}.json").is_file():
        probe = {r["epoch"]: r for r in json.loads(p.read_text())["epochs"]}
    epochs = []
    for step in sorted(by_step):
        row = {"epoch": step, "wall_s": by_step[step]}
        if step in probe:
            row |= {"cpu_s": probe[step]["cpu_s"], "thread_cpu_s": probe[step]["thread_cpu_s"],
                    "train_epoch_wall_s": probe[step]["wall_s"]}
        epochs.append(row)
    return {"epochs": epochs, "run_wall_s": wall, "run_id": out.run_id, "name": name}


def _timed(runs: list[dict[str, Any]], key: str) -> list[float]:
    """Values of ``key`` over every run's epochs after the first (warm-up)."""
    return [e[key] for r in runs for e in r["epochs"][1:] if key in e]


def _med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in ("bare", "ray"):
        walls = _timed(runs[path], "wall_s")
        q = statistics.quantiles(walls, n=4) if len(walls) >= 2 else [walls[0]] * 3
        out[path] = {
            "timed_epochs": len(walls),
            "median_epoch_s": _med(walls),
            "min_epoch_s": min(walls), "max_epoch_s": max(walls), "iqr_epoch_s": q[2] - q[0],
            "median_epoch_cpu_s": _med(_timed(runs[path], "cpu_s")),
            "median_epoch_thread_cpu_s": _med(_timed(runs[path], "thread_cpu_s")),
            "median_run_wall_s": _med([r["run_wall_s"] for r in runs[path]]),
            "warmup_epoch_s": _med([r["epochs"][0]["wall_s"] for r in runs[path]]),
        }
    b, r = out["bare"], out["ray"]
    out["ratio"] = r["median_epoch_s"] / b["median_epoch_s"]
    per_round = [
        statistics.median(e["wall_s"] for e in rr["epochs"][1:]) / statistics.median(e["wall_s"] for e in br["epochs"][1:])
        for br, rr in zip(runs["bare"], runs["ray"])
    ]
    out["paired_ratio"] = statistics.median(per_round)
    out["round_ratios"] = per_round
    for k in ("cpu", "thread_cpu"):
        nb, nr = b[f"median_epoch_{k}_s"], r[f"median_epoch_{k}_s"]
        out[f"{k}_ratio"] = nr / nb if nb and nr else None
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'm.db'}"
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    probe_dir = None if args.no_cpu_probe else str(tmp / "probe")
    if probe_dir:
        os.makedirs(probe_dir, exist_ok=True)

    import ray
    import torch

    from orchestrator.config import load_config
    from orchestrator.session import ensure_ray

    torch.set_num_threads(1)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    ensure_ray()
    ray_init_s = time.perf_counter() - t0
    results: dict[str, Any] = {}
    stamp = time.strftime("%H%M%S")
    try:
        for wl in [w.strip() for w in args.workloads.split(",") if w.strip()]:
            if wl not in WORKLOADS:
                raise SystemExit(f"--workloads: unknown {wl!r}; choose from {', '.join(WORKLOADS)}")
            overrides = workload_overrides(wl, args, str(tmp / "ray_results"))
            cfg = load_config(args.config, overrides)
            runs: dict[str, list[dict[str, Any]]] = {"bare": [], "ray": []}
            loads = [os.getloadavg()[0]]
            for r in range(args.rounds):
                order = ("bare", "ray") if r % 2 == 0 else ("ray", "bare")
                for path in order:
                    if path == "bare":
                        res = bare_run(cfg)
                    else:
                        res = ray_run(cfg, f"{wl}-{stamp}-r{r}", probe_dir)
                    runs[path].append(res)
                    print(f"# {wl} round {r + 1}/{args.rounds} {path}: epochs "
                          + " ".join(f"{e['wall_s']:.3f}" for e in res["epochs"])
                          + f" s; run {res['run_wall_s']:.1f} s; load {os.getloadavg()[0]:.2f}", file=sys.stderr)
                    loads.append(os.getloadavg()[0])
            results[wl] = {
                "overrides": overrides,
                "model": cfg.model.name, "dataset": cfg.data.name, "method": cfg.method,
                "batch_size": cfg.data.batch_size, "epochs_per_run": cfg.train.epochs,
                "steps_per_epoch": runs["bare"][0]["steps_per_epoch"],
                "train_samples": runs["bare"][0]["train_samples"],
                "load_1min": {"min": min(loads), "max": max(loads), "median": statistics.median(loads)},
                "runs": runs,
                "summary": summarise(runs),
            }
    finally:
        ray.shutdown()
    from benchmarks.step_cost import cpu_name

    return {
        "machine": cpu_name(),
        "torch": torch.__version__, "ray": ray.__version__,
        "threads": 1,
        "ray_init_s": ray_init_s,
        "load_at_start": list(load_start),
        "rounds": args.rounds,
        "store": str(tmp),
        "command": "python " + " ".join(sys.argv),
        "workloads": results,
    }


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def table(res: dict[str, Any]) -> str:
    lines = [
        f"{res['machine']}, torch {res['torch']}, Ray {res['ray']}, 1 torch thread on both paths; "
        f"{res['rounds']} interleaved rounds (one bare run and one Ray run each), first epoch of every run "
        f"excluded; ray.init {res['ray_init_s']:.1f} s (once)",
        "",
        "| workload | path | timed epochs | median epoch s (min–max) | epoch CPU s (process / thread) "
        "| whole run s | Ray / bare epoch (paired) | CPU ratio (process / thread) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for wl, w in res["workloads"].items():
        s = w["summary"]
        desc = (f"{w['model']}, {w['dataset']}, {w['method']}, batch {w['batch_size']}, "
                f"{w['train_samples']} images = {w['steps_per_epoch']} steps/epoch")
        for path, label in (("bare", "bare loop"), ("ray", "TorchTrainer, 1 worker")):
            p = s[path]
            ratio = (f"**{s['ratio']:.3f}** ({s['paired_ratio']:.3f})" if path == "ray" else "")
            cpu = (f"{_f(s['cpu_ratio'])} / {_f(s['thread_cpu_ratio'])}" if path == "ray" else "")
            lines.append(
                f"| {desc if path == 'bare' else ''} | {label} | {p['timed_epochs']} "
                f"| {p['median_epoch_s']:.3f} ({p['min_epoch_s']:.3f}–{p['max_epoch_s']:.3f}) "
                f"| {_f(p['median_epoch_cpu_s'])} / {_f(p['median_epoch_thread_cpu_s'])} "
                f"| {p['median_run_wall_s']:.1f} | {ratio} | {cpu} |"
            )
        worst = max(s["ratio"], s["paired_ratio"])
        verdicts.append(
            f"{wl}: Ray / bare epoch time {s['ratio']:.3f} (paired {s['paired_ratio']:.3f}, rounds "
            + ", ".join(f"{x:.3f}" for x in s["round_ratios"])
            + f"); target <= {TARGET}: {'met' if worst <= TARGET else 'MISSED'}; load average (1 min) "
            f"{w['load_1min']['min']:.1f}–{w['load_1min']['max']:.1f} during the runs"
        )
    return "\n".join(lines + [""] + verdicts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = measure(args)
    print(table(res))
    if args.json:
        text = json.dumps(res, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
