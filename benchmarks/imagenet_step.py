"""Training images/s of natural, SPROUT, PGD-AT and TRADES on ImageNet-sized synthetic data.

SPEC §8 / issue 6 targets: SPROUT images/s ≥ 0.95 × natural images/s (ResNet-152, 224²,
bf16, one H100; ResNet-50 at a small size on CPU), and PGD-AT step time ≥ 7 × SPROUT's.

A step is ``trainables.loop.train_step`` (method.loss under autocast + backward +
optimizer.step + method.after_step), exactly what ``train_epoch`` runs per batch, with
the device synchronised before and after (``--clock cpu`` times the process's CPU time
instead of wall time: on a CPU shared with other jobs, that is the step's own cost). All methods share one model and optimizer and
are timed in interleaved rounds (rotated order) after a warm-up, so drift in machine load
or clocks hits them alike; reported is the median step time over all timed steps. Inputs
are a fixed random batch already on the device: the input pipeline is measured on its
own by ``benchmarks/decode_throughput.py`` (``--h2d`` adds a pinned uint8 host-to-device
copy and the float conversion to every step, as ``orchestrator.ray_data`` delivers it).

    python benchmarks/imagenet_step.py --model resnet50 --image-size 96 --batch-size 8 --out r50_cpu.json
    python benchmarks/imagenet_step.py --model resnet152 --batch-size 128 --bf16 --channels-last --out r152.json

Exit code 3 when the batch does not fit in GPU memory (so a script can retry smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

from trainables import METHODS, MODELS
from trainables.loop import OptimConfig, StepOptions, build_optimizer, train_step
from trainables.methods import build_method

DEFAULT_METHODS = "natural,sprout,pgd_at,trades"
OOM_EXIT = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50", choices=["resnet50", "resnet152"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated; natural is always included")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method per round")
    ap.add_argument("--adv-steps", type=int, default=None,
                    help="timed steps per round for pgd_at/trades (~8-12× a natural step; default max(1, steps//3))")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method first (cuDNN autotune, compile)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ap.add_argument("--channels-last", action="store_true", help="model and inputs in channels-last layout")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    ap.add_argument("--h2d", action="store_true", help="include a pinned uint8 host→device copy + float conversion")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time per step (CPU device only); robust on a shared machine")
    ap.add_argument("--lr", type=float, default=1e-3, help="small: the same batch is trained on repeatedly")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", metavar="PATH", help="write the results as JSON here")
    return ap.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "arch": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                 "gpu_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)}
    return info


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    names = ["natural"] + [n for n in dict.fromkeys(names) if n != "natural"]
    for n in names:
        METHODS[n]  # noqa: B018 - raises a KeyError listing the registered methods
    torch.manual_seed(args.seed)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    # one model and optimizer for all methods: a step's cost does not depend on the weights
    model = MODELS[args.model](num_classes=args.num_classes).to(device, memory_format=fmt).train()
    forward = torch.compile(model) if args.compile else model
    opt = build_optimizer(model, OptimConfig(lr=args.lr))
    opts = StepOptions(autocast_dtype=torch.bfloat16 if args.bf16 else None, channels_last=args.channels_last,
                       non_blocking=True)
    methods = {n: build_method(n, {}, num_classes=args.num_classes, lr=args.lr, seed=args.seed).to(device)
               for n in names}
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    x = torch.rand(shape, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    host = torch.randint(0, 256, shape, dtype=torch.uint8)
    if device.type == "cuda":
        host = host.pin_memory()

    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures CPU devices only")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def step(n: str) -> float:
        _sync(device)
        t0 = clock()
        xb = x
        if args.h2d:
            xb = host.to(device, non_blocking=True).float().div_(255.0).contiguous(memory_format=fmt)
        train_step(forward, methods[n], opt, xb, y, opts=opts)
        _sync(device)
        return clock() - t0

    adversarial = {"pgd_at", "trades", "free_at", "fgsm_rs"}
    adv_steps = args.adv_steps if args.adv_steps is not None else max(1, args.steps // 3)
    t_start = time.perf_counter()
    for n in names:
        for _ in range(args.warmup):
            step(n)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            for _ in range(adv_steps if n in adversarial else args.steps):
                times[n].append(step(n))
    nat = statistics.median(times["natural"])
    spr = statistics.median(times["sprout"]) if "sprout" in times else None
    rows = []
    for n in names:
        med = statistics.median(times[n])
        rows.append({
            "method": n,
            "images_per_s": args.batch_size / med,
            "ms_per_step": med * 1e3,
            "images_per_s_vs_natural": nat / med,
            "step_time_vs_sprout": med / spr if spr else None,
            "min_ms": min(times[n]) * 1e3,
            "max_ms": max(times[n]) * 1e3,
            "n_timed": len(times[n]),
        })
    res = {
        "model": args.model,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "num_classes": args.num_classes,
        "device": str(device),
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "h2d": args.h2d,
        "clock": args.clock,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "adv_steps_per_round": adv_steps,
        "seconds": time.perf_counter() - t_start,
        "machine": machine(device),
        "command": "python " + " ".join(sys.argv),
        "results": rows,
    }
    if device.type == "cuda":
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return res


def table(res: dict[str, Any]) -> str:
    m = res["machine"]
    where = m.get("gpu") or f"{m['arch']} CPU, {m['threads']} threads"
    flags = [f for f in ("bf16", "channels_last", "compile", "h2d") if res[f]]
    lines = [
        f"{res['model']}, {res['image_size']}², batch {res['batch_size']}, {res['num_classes']} classes, "
        f"{res['device']} ({where}), torch {m['torch']}{', ' + ', '.join(flags) if flags else ''}; median of "
        f"{res['rounds']} interleaved rounds × {res['steps_per_round']} steps "
        f"({res['adv_steps_per_round']} for adversarial methods) after {res['warmup']} warm-up, {res['clock']} clock",
        "",
        "| method | images/s | ms/step | images/s ÷ natural | step time ÷ SPROUT |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["results"]:
        vs_sprout = f"{r['step_time_vs_sprout']:.2f}" if r["step_time_vs_sprout"] is not None else "–"
        lines.append(f"| {r['method']} | {r['images_per_s']:.1f} | {r['ms_per_step']:.1f} | "
                     f"{r['images_per_s_vs_natural']:.3f} | {vs_sprout} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        res = measure(args)
    except torch.cuda.OutOfMemoryError as e:
        print(f"imagenet_step: batch {args.batch_size} does not fit: {str(e).splitlines()[0]}", file=sys.stderr)
        return OOM_EXIT
    print(table(res))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
