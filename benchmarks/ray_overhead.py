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
remaining epochs of all runs. Runs alternate bare, Ray, bare, Ray, ..., bare, so load drift on
a shared machine hits both alike; the "paired" ratio is the median over Ray runs of each Ray
run's median / the median of the two bare runs around it. Process and thread CPU seconds of ``train_epoch`` are
recorded too (in the Ray worker through a thin wrapper around ``trainables.loop.train_epoch``
installed before ``train_loop_per_worker`` runs; it adds three clock reads per epoch,
``--no-cpu-probe`` turns it off). Thread CPU is the training thread's own work (1 torch
thread: all compute runs on it); process CPU adds every other thread of the process (Ray's
core-worker threads in the worker, the driver's in the bare process).

Ray starts its worker processes at nice 15 (``RAY_worker_niceness``, Ray's default), the bare
loop runs at this process's niceness (normally 0): under contention from other nice-0 work the
Ray worker gets a far smaller CPU share. ``--worker-niceness 0`` sets ``RAY_worker_niceness``
for the local Ray started here; the table shows both processes' niceness. A separate sampler
process reads /proc to report how much CPU this Ray session's other processes (raylet, GCS,
dashboard, Train controller, helper actors, driver) use during the timed epochs.

The whole-run wall time (``run_training``: MLflow run, trainer and worker start-up, epochs,
per-epoch validation and checkpoint, shutdown) and ``ray.init`` are reported separately: a
fixed start-up cost, not the target.

    python benchmarks/ray_overhead.py --rounds 2 --json ray_overhead.json     # digits small_cnn and VGG-16 32×32
    python benchmarks/ray_overhead.py --rounds 2 --worker-niceness 0 --json ray_overhead_nice0.json
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

from benchmarks._emit import emit  # noqa: E402 - needs the repo root on sys.path

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
                    help="epochs per run, the first is warm-up (default: 12 digits, 4 vgg16)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="Ray runs, each between two bare runs (bare, Ray, bare, Ray, ..., bare)")
    ap.add_argument("--vgg-samples", type=int, default=192,
                    help="synthetic training images for vgg16 (an epoch of a few seconds on 1 CPU thread)")
    ap.add_argument("--no-cpu-probe", action="store_true", help="do not wrap train_epoch in the Ray worker")
    ap.add_argument("--no-ray-cpu", action="store_true",
                    help="do not sample (from /proc, in a separate process) the CPU of Ray's other processes")
    ap.add_argument("--sampler", nargs=3, metavar=("ROOT_PID", "OUT", "INTERVAL"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-niceness", type=int, default=None,
                    help="set RAY_worker_niceness for the local Ray started here (Ray's default: 15; "
                         "the bare loop runs at this process's niceness)")
    ap.add_argument("--keep", metavar="DIR", help="use DIR for the MLflow store and storage (default: a temp dir)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    return ap.parse_args(argv)


def workload_overrides(name: str, args: argparse.Namespace, storage: str) -> list[str]:
    epochs = args.epochs or (12 if name == "digits" else 4)
    extra = [f"data.num_samples={args.vgg_samples}"] if name == "vgg16" else []
    return WORKLOADS[name] + extra + COMMON + [f"train.epochs={epochs}", f"storage.path={storage}"] + args.overrides


def _clocks() -> tuple[float, float, float]:
    return time.perf_counter(), time.process_time(), time.thread_time()


def bare_run(cfg: Any) -> dict[str, Any]:
    """build_run + train_epoch in this process, as the Ray worker does them (1 thread)."""
    import torch

    from orchestrator.worker import build_run, step_options
    from trainables.loop import set_epoch_lr, train_epoch

    torch.set_num_threads(max(1, round(cfg.scaling.cpus_per_worker)))
    t_run = time.perf_counter()
    device = torch.device("cpu")
    run = build_run(cfg, rank=0, world=1, device=device)
    opts = step_options(cfg, device)
    epochs = []
    for epoch in range(run.epochs):
        set_epoch_lr(run.optimizer, run.method, epoch, run.epochs, run.optim)  # as the Ray worker does
        start = time.time()
        w, c, t = _clocks()
        train_epoch(run.model, run.method, run.optimizer, run.train_loader, device, epoch=epoch,
                    seed=cfg.train.seed, rank=0, opts=opts, max_steps=cfg.train.max_steps_per_epoch,
                    augment=run.augment)
        w2, c2, t2 = _clocks()
        epochs.append({"epoch": epoch + 1, "wall_s": w2 - w, "cpu_s": c2 - c, "thread_cpu_s": t2 - t,
                       "window": (start, time.time())})
    return {"epochs": epochs, "run_wall_s": time.perf_counter() - t_run, "threads": torch.get_num_threads(),
            "nice": os.nice(0),
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
            start = _time.time()
            w, c, t = _time.perf_counter(), _time.process_time(), _time.thread_time()
            out = inner(*a, **k)
            rows.append({"epoch": k.get("epoch", -1) + 1, "wall_s": _time.perf_counter() - w,
                         "cpu_s": _time.process_time() - c, "thread_cpu_s": _time.thread_time() - t,
                         "window": (start, _time.time())})
            return out

        core.train_epoch = train_epoch  # train_loop_per_worker imports it at call time
        try:
            original(config)
        finally:
            core.train_epoch = inner
            path = _os.path.join(probe_dir, f"{config.get('name', 'run')}.json")
            with open(path, "w") as f:
                _json.dump({"pid": _os.getpid(), "nice": _os.nice(0), "epochs": rows}, f)

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
    worker_pid = nice = None
    if probe_dir is not None and (p := Path(probe_dir) / f"{name}.json").is_file():
        data = json.loads(p.read_text())
        probe, worker_pid, nice = {r["epoch"]: r for r in data["epochs"]}, data["pid"], data.get("nice")
    epochs = []
    for step in sorted(by_step):
        row = {"epoch": step, "wall_s": by_step[step]}
        if step in probe:
            row |= {"cpu_s": probe[step]["cpu_s"], "thread_cpu_s": probe[step]["thread_cpu_s"],
                    "train_epoch_wall_s": probe[step]["wall_s"], "window": tuple(probe[step]["window"])}
        epochs.append(row)
    return {"epochs": epochs, "run_wall_s": wall, "run_id": out.run_id, "name": name, "pid": worker_pid,
            "nice": nice}


def _proc_cpu(root: int, tick: int, names: dict[int, str]) -> dict[int, float]:
    """CPU seconds (user + system) of ``root`` and all its descendants, from /proc."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d)] = int(fields[1])
        cpu[int(d)] = (int(fields[11]) + int(fields[12])) / tick
    mine = {}
    for pid in cpu:
        p, hops = pid, 0
        while p > 1 and hops < 64:
            if p == root:
                mine[pid] = cpu[pid]
                break
            p, hops = parent.get(p, 0), hops + 1
    for pid in mine:  # re-read: a worker's title changes (setproctitle) once it becomes an actor
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                names[pid] = _proc_name([a.decode(errors="replace") for a in f.read().split(b"\0") if a])
        except OSError:
            names[pid] = "?"
    return mine


def _proc_name(argv: list[str]) -> str:
    """'ray::TrainController.run', 'ray-dashboard-NodeHead-0', 'raylet', 'python3 dashboard.py', ..."""
    if not argv:
        return "?"
    if len(argv) == 1:  # a title set by setproctitle
        return argv[0].split(" (", 1)[0].split(" ", 1)[0][:60]
    script = next((a.rsplit("/", 1)[-1] for a in argv[1:] if a.endswith(".py")), "")
    return (argv[0].rsplit("/", 1)[-1] + (f" {script}" if script else ""))[:60]


def sampler_main(root: int, out: str, interval: float) -> int:
    """Runs in its own process (no GIL shared with the bare loop): one JSON line per sample."""
    tick = os.sysconf("SC_CLK_TCK")
    names: dict[int, str] = {}
    with open(out, "w") as f:
        while os.path.exists(f"/proc/{root}"):
            cpu = _proc_cpu(root, tick, names)
            f.write(json.dumps({"t": time.time(), "cpu": cpu, "names": {p: names[p] for p in cpu}}) + "\n")
            f.flush()
            time.sleep(interval)
    return 0


class RaySessionCPU:
    """CPU of every process of this Ray session (the driver's descendants: gcs_server,
    raylet, dashboard, the Train controller and helper actors, the worker), sampled from
    /proc by a separate process, so the CPU that Ray's *other* processes take while an
    epoch runs can be measured: on 2 cores it competes with the training thread. Linux only."""

    def __init__(self, path: str, interval: float = 0.1) -> None:
        self.path, self.interval, self.proc = path, interval, None
        self.samples: list[tuple[float, dict[int, float]]] = []
        self.names: dict[int, str] = {}

    def __enter__(self) -> RaySessionCPU:
        import subprocess

        if Path("/proc/self/stat").exists():
            self.proc = subprocess.Popen([sys.executable, __file__, "--sampler", str(os.getpid()), self.path,
                                          str(self.interval)])
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()

    def load(self) -> None:
        self.samples = []
        if not Path(self.path).is_file():
            return
        for line in Path(self.path).read_text().splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            self.samples.append((d["t"], {int(k): v for k, v in d["cpu"].items()}))
            self.names.update({int(k): v for k, v in d["names"].items()})

    def during(self, windows: list[tuple[float, float]], exclude: set[int]) -> dict[str, Any]:
        """Cores (CPU s / wall s) used by the session's processes other than ``exclude``
        inside ``windows`` (between the first and last sample in each window), by process."""
        import bisect

        self.load()
        times = [t for t, _ in self.samples]
        exclude = exclude | ({self.proc.pid} if self.proc is not None else set())
        per: dict[str, float] = {}
        span = 0.0
        for a, b in windows:
            i, j = bisect.bisect_left(times, a), bisect.bisect_right(times, b) - 1
            if j <= i:
                continue
            (ta, ca), (tb, cb) = self.samples[i], self.samples[j]
            span += tb - ta
            for pid, v in cb.items():
                used = v - ca.get(pid, v)
                if pid not in exclude and used > 0:
                    key = self.names.get(pid, str(pid))
                    per[key] = per.get(key, 0.0) + used
        if span <= 0:
            return {}
        return {"sampled_s": span, "total_cores": sum(per.values()) / span,
                "by_process": {k: v / span for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v / span >= 0.005}}

def _windows(runs: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """The timed (non-warm-up) epochs' (start, end) in epoch seconds."""
    return [tuple(e["window"]) for r in runs for e in r["epochs"][1:] if "window" in e]


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
    # each Ray run against the bare runs just before and after it
    per_round = [
        statistics.median(e["wall_s"] for e in rr["epochs"][1:])
        / statistics.median([e["wall_s"] for br in runs["bare"][i:i + 2] for e in br["epochs"][1:]])
        for i, rr in enumerate(runs["ray"])
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
    if args.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # read by the raylet started below
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
    sampler = RaySessionCPU(str(tmp / "proc_cpu.jsonl")) if not args.no_ray_cpu else None
    try:
        if sampler is not None:
            sampler.__enter__()
        for wl in [w.strip() for w in args.workloads.split(",") if w.strip()]:
            if wl not in WORKLOADS:
                raise SystemExit(f"--workloads: unknown {wl!r}; choose from {', '.join(WORKLOADS)}")
            overrides = workload_overrides(wl, args, str(tmp / "ray_results"))
            cfg = load_config(args.config, overrides)
            runs: dict[str, list[dict[str, Any]]] = {"bare": [], "ray": []}
            loads = [os.getloadavg()[0]]
            # bare, Ray, bare, Ray, ..., bare: every Ray run sits between two bare runs
            sequence = [("bare", 0)] + [x for r in range(args.rounds) for x in (("ray", r), ("bare", r + 1))]
            for path, r in sequence:
                if path == "bare":
                    res = bare_run(cfg)
                else:
                    res = ray_run(cfg, f"{wl}-{stamp}-r{r}", probe_dir)
                runs[path].append(res)
                print(f"# {wl} {path} run {r + 1}: epochs "
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
                "nice": {"bare": runs["bare"][0]["nice"], "ray_worker": runs["ray"][0].get("nice")},
                "runs": runs,
                "summary": summarise(runs),
            }
            if sampler is not None:
                results[wl]["ray_background_cores"] = {
                    "bare": sampler.during(_windows(runs["bare"]), {os.getpid()}),
                    "ray": sampler.during(_windows(runs["ray"]), {r["pid"] for r in runs["ray"] if r.get("pid")}),
                }
    finally:
        if sampler is not None:
            sampler.__exit__()
        ray.shutdown()
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)  # checkpoints of VGG-16 runs are ~60 MB each
    from benchmarks.step_cost import cpu_name

    return {
        "machine": cpu_name(),
        "torch": torch.__version__, "ray": ray.__version__,
        "threads": 1,
        "ray_init_s": ray_init_s,
        "load_at_start": list(load_start),
        "rounds": args.rounds,
        "store": str(tmp) if args.keep else None,
        "command": "python " + " ".join(sys.argv),
        "workloads": results,
    }


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def table(res: dict[str, Any]) -> str:
    lines = [
        f"{res['machine']}, torch {res['torch']}, Ray {res['ray']}, 1 torch thread on both paths; "
        f"{res['rounds']} Ray runs interleaved with {res['rounds'] + 1} bare runs (bare, Ray, bare, ...), "
        f"first epoch of every run excluded; ray.init {res['ray_init_s']:.1f} s (once)",
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
        nice = w.get("nice", {})
        for path, label in (("bare", f"bare loop (nice {nice.get('bare')})"),
                            ("ray", f"TorchTrainer, 1 worker (nice {nice.get('ray_worker', '?')})")):
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
        bg = w.get("ray_background_cores") or {}
        if bg.get("ray") and bg.get("bare"):
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(bg["ray"]["by_process"].items())[:6])
            verdicts.append(
                f"{wl}: CPU used by this Ray session's other processes (cores, /proc): during bare epochs "
                f"{bg['bare']['total_cores']:.2f} (idle Ray + driver threads excluded: the bare loop's own process), "
                f"during the worker's epochs {bg['ray']['total_cores']:.2f} ({top})"
            )
    return "\n".join(lines + [""] + verdicts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sampler:
        return sampler_main(int(args.sampler[0]), args.sampler[1], float(args.sampler[2]))
    res = measure(args)
    return emit(res, table(res), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
