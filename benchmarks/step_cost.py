"""Training-step cost of every method relative to ``natural`` (SPEC §8, issue 2).

A *step* is what ``trainables.loop.train_epoch`` does for one optimizer step:
``trainables.loop.train_step`` = method.loss + backward + optimizer.step + method.after_step
(+ zero_grad). Free-AT takes ``replays`` such steps per minibatch; the table shows both.

All methods are measured side by side in one process, on one shared model and optimizer
(each method keeps its own state: SPROUT's β, Free-AT's δ), in interleaved rounds (every
round times a few steps of every method, in a rotated order), after a warm-up, so drift
in machine load hits all methods alike. Reported: median ms/step over all timed steps,
the ratio of medians against ``natural``, and the "paired" ratio (the median over rounds
of each round's median against natural's in the same round; the more robust of the two
on a shared machine).

    python benchmarks/step_cost.py --model small_cnn --dataset digits --batch-size 128
    python benchmarks/step_cost.py --model vgg16 --dataset synthetic --image-size 32 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._emit import emit  # noqa: E402 - needs the repo root on sys.path
from trainables import DATASETS, METHODS, MODELS
from trainables.data import dataset_info
from trainables.loop import OptimConfig, StepOptions, build_optimizer, train_step
from trainables.methods import build_method

TARGET = 1.05  # SPEC §8: SPROUT step time / natural step time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small_cnn", help=f"one of {', '.join(MODELS)}")
    ap.add_argument("--dataset", default="digits", choices=["digits", "synthetic"])
    ap.add_argument("--image-size", type=int, default=32, help="synthetic only")
    ap.add_argument("--channels", type=int, default=3, help="synthetic only")
    ap.add_argument("--num-classes", type=int, default=10, help="synthetic only")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all registered)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per method before timing")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per method per round")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (as train.precision: bf16)")
    ap.add_argument("--no-malloc-trim", action="store_true",
                    help="glibc only: keep freed memory mapped (mallopt), so CPU timings do not depend on "
                         "each method's allocation pattern through page faults (see BENCHMARKS.md)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    return ap.parse_args(argv)


def _batch(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Any]:
    if args.dataset == "digits":
        ds = DATASETS["digits"](split="train", seed=args.seed)
    else:
        ds = DATASETS["synthetic"](
            split="train", seed=args.seed, image_size=args.image_size, channels=args.channels,
            num_classes=args.num_classes, num_samples=max(args.batch_size, 64),
        )
    x, y = ds.tensors()
    if args.batch_size > x.shape[0]:
        reps = -(-args.batch_size // x.shape[0])
        x, y = x.repeat(reps, 1, 1, 1), y.repeat(reps)
    return x[: args.batch_size].to(device), y[: args.batch_size].to(device), dataset_info(ds)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def keep_freed_memory_mapped() -> bool:
    """glibc mallopt: no heap trimming and no mmap for large blocks, so freed activation
    buffers are reused instead of being unmapped and page-faulted back in every step (the
    like MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ / MALLOC_TOP_PAD_ in the environment)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(name)
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    settings = ((m_trim_threshold, 1 << 30), (m_top_pad, 256 << 20), (m_mmap_threshold, 1 << 25))
    return all(libc.mallopt(opt, val) == 1 for opt, val in settings)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_tuned = keep_freed_memory_mapped() if args.no_malloc_trim else False
    device = torch.device(args.device)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    names = ["natural"] + [n for n in dict.fromkeys(names) if n != "natural"]
    for n in names:
        METHODS[n]  # noqa: B018 - raises a KeyError listing the registered methods
    x, y, info = _batch(args, device)
    torch.manual_seed(args.seed)
    # One model and one optimizer for all methods: a step's cost does not depend on the
    # weights' values, and sharing them removes differences of memory placement between
    # copies (which showed up as a few % between two identical natural copies).
    model = MODELS[args.model](num_classes=info.num_classes, in_channels=info.channels, mean=info.mean, std=info.std)
    model.to(device).train()
    opt = build_optimizer(model, OptimConfig(lr=args.lr))
    opts = StepOptions(autocast_dtype=torch.bfloat16 if args.bf16 else None)
    methods = {
        n: build_method(n, {}, num_classes=info.num_classes, lr=args.lr, seed=args.seed).to(device) for n in names
    }

    def step(n: str) -> float:
        _sync(device)
        t0 = time.perf_counter()
        train_step(model, methods[n], opt, x, y, opts=opts)
        _sync(device)
        return time.perf_counter() - t0

    for n in names:
        for _ in range(args.warmup):
            step(n)
    times: dict[str, list[float]] = {n: [] for n in names}
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            ts = [step(n) for _ in range(args.steps)]
            times[n] += ts
            per_round[n].append(statistics.median(ts))
    nat = statistics.median(times["natural"])
    rows = []
    for n in names:
        med = statistics.median(times[n])
        replays = methods[n].replays
        # each round's median against natural's in the same round: robust to load drift
        paired = statistics.median(a / b for a, b in zip(per_round[n], per_round["natural"]))
        rows.append({
            "method": n,
            "ms_per_step": med * 1e3,
            "ratio_vs_natural": med / nat,
            "paired_ratio_vs_natural": paired,
            "steps_per_batch": replays,
            "ms_per_batch": med * 1e3 * replays,
            "batch_ratio_vs_natural": med * replays / nat,
            "min_ms": min(times[n]) * 1e3,
            "max_ms": max(times[n]) * 1e3,
            "n_timed": len(times[n]),
        })
    return {
        "model": args.model,
        "dataset": args.dataset,
        "input_shape": list(x.shape[1:]),
        "batch_size": args.batch_size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "bf16": bool(args.bf16),
        "malloc_no_trim": malloc_tuned,
        "torch": torch.__version__,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "command": "python " + " ".join(sys.argv),
        "results": rows,
    }


def table(res: dict[str, Any]) -> str:
    shape = "×".join(str(s) for s in res["input_shape"])
    lines = [
        f"{res['model']} on {res['dataset']} ({shape}), batch {res['batch_size']}, {res['device']} "
        f"[{res['device_name']}] ({res['threads']} threads), torch {res['torch']}{', bf16' if res['bf16'] else ''}"
        f"{', malloc no-trim' if res.get('malloc_no_trim') else ''}; "
        f"median of {res['rounds']}×{res['steps_per_round']} interleaved steps after {res['warmup']} warm-up",
        "",
        "| method | ms/step | step / natural | paired step / natural | steps/batch | ms/batch | batch / natural |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["results"]:
        lines.append(
            f"| {r['method']} | {r['ms_per_step']:.2f} | {r['ratio_vs_natural']:.3f} "
            f"| {r['paired_ratio_vs_natural']:.3f} | {r['steps_per_batch']} "
            f"| {r['ms_per_batch']:.2f} | {r['batch_ratio_vs_natural']:.3f} |"
        )
    sprout = next((r for r in res["results"] if r["method"] == "sprout"), None)
    if sprout is not None:
        worst = max(sprout["ratio_vs_natural"], sprout["paired_ratio_vs_natural"])
        lines += ["", f"SPROUT step / natural step: {sprout['ratio_vs_natural']:.3f} (paired "
                  f"{sprout['paired_ratio_vs_natural']:.3f}); target <= {TARGET}: {'met' if worst <= TARGET else 'MISSED'}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = measure(args)
    return emit(res, table(res), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
