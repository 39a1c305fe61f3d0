"""Examples/s of the final evaluation's shard on a GPU vs the same host's CPU (issue 11).

Runs ``trainables.evaluation.run_suite`` — the function each evaluation shard's Ray task runs
(``orchestrator.evaluate._eval_shard``) — on VGG-16 at 32×32 (random weights, BatchNorm
statistics from the data, labels = the model's own clean predictions so every example is
attacked, as in ``benchmarks/eval_cost.py``), once on ``cuda`` and once on the CPU with all
of the host's cores, side by side in one run:

- PGD-20 at ε = 8/255 (SPEC's step rule 2.5·ε/20), ``--n-pgd`` examples on the GPU;
- AutoAttack standard at ε = 8/255, with its robust accuracy: the random VGG-16 keeps its
  points at 8/255 (measured: PGD-20 and AutoAttack accuracy 1.0), so APGD-CE, APGD-T, FAB-T and
  Square run in full on every example — the cost of evaluating a perfectly robust model, an
  upper bound (``--worst`` adds the same at ε = 0, where nothing can break by construction);
- exactness on the GPU: two shards' summed PGD-20 counts against the unsharded counts.

The CPU side runs on fewer examples (``--n-cpu``) and is reported per example, like the GPU.

    python benchmarks/eval_gpu.py --out eval_gpu.json            # on a GPU machine
    python benchmarks/eval_gpu.py --device cpu --n-pgd 8 --n-aa 2 --n-cpu 4 --batch 4  # plumbing, no GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._emit import emit  # noqa: E402
from trainables import DATASETS, MODELS  # noqa: E402
from trainables.evaluation import EvalConfig, run_suite  # noqa: E402

EPS = 8 / 255


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_suite(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: list[str], cfg: EvalConfig,
                device: str, **kw: Any) -> tuple[Any, float]:
    _sync(device)
    t = time.perf_counter()
    res = run_suite(model, (x, y), attacks, cfg, device=device, **kw)
    _sync(device)
    return res, time.perf_counter() - t


def vgg_and_data(n: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    vgg = MODELS["vgg16"](num_classes=10)
    x, _ = DATASETS["synthetic"](split="test", image_size=32, channels=3, num_samples=max(5 * n, 320)).tensors()
    with torch.no_grad():
        vgg.train()(x[:256])  # BatchNorm statistics of the data, so the random network reacts to its input
        vgg.eval()
        x = x[:n]
        y = torch.cat([vgg(x[i:i + 256]).argmax(1) for i in range(0, n, 256)])
    return vgg, x, y


def measure(device: str, n_pgd: int, n_aa: int, batch: int, rows: list[dict[str, Any]], worst: bool = False) -> None:
    vgg, x, y = vgg_and_data(max(n_pgd, n_aa))
    vgg = vgg.to(device)
    base = dict(eps=EPS, autoattack_eps=EPS, seed=0, batch_size=batch)
    # warm-up (cuDNN autotuning, allocator, AutoAttack's first call)
    timed_suite(vgg, x[:min(batch, 32)], y[:min(batch, 32)], ["pgd20"], EvalConfig(**base), device)
    res, s = timed_suite(vgg, x[:n_pgd], y[:n_pgd], ["pgd20"], EvalConfig(**base), device)
    rows.append({"device": device, "attack": "PGD-20", "eps": EPS, "n": n_pgd, "acc": res.accuracies()["test/pgd20_acc"],
                 "s": s, "examples_per_s": n_pgd / s})
    print(rows[-1], flush=True)
    cases = [("AutoAttack standard", EPS)] + ([("AutoAttack standard (eps=0: nothing breaks)", 0.0)] if worst else [])
    for label, eps in cases:
        cfg = EvalConfig(**dict(base, autoattack_eps=eps, batch_size=max(batch, n_aa)))
        res, s = timed_suite(vgg, x[:n_aa], y[:n_aa], ["autoattack"], cfg, device)
        rows.append({"device": device, "attack": label, "eps": eps, "n": n_aa,
                     "acc": res.accuracies()["test/autoattack_acc"], "s": s, "examples_per_s": n_aa / s})
        print(rows[-1], flush=True)


def shard_exactness(device: str, n: int, batch: int) -> dict[str, Any]:
    vgg, x, y = vgg_and_data(n)
    vgg = vgg.to(device)
    cfg = EvalConfig(eps=EPS, seed=0, batch_size=batch)
    whole, _ = timed_suite(vgg, x, y, ["pgd20"], cfg, device)
    parts = [timed_suite(vgg, x, y, ["pgd20"], cfg, device, shard=i, num_shards=2)[0] for i in range(2)]
    summed = parts[0] + parts[1]
    return {"device": device, "n": n, "unsharded": whole.counts, "two_shards_summed": summed.counts,
            "equal": whole.counts == summed.counts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n-pgd", type=int, default=2000)
    ap.add_argument("--n-aa", type=int, default=100)
    ap.add_argument("--n-cpu", type=int, default=4, help="PGD-20 examples on the CPU side (AutoAttack: a quarter)")
    ap.add_argument("--batch", type=int, default=500, help="the evaluation's block size (eval.batch_size)")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--worst", action="store_true", help="also AutoAttack at ε = 0 (no point can break: every stage in full)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a plumbing check", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = False  # the suite's own setting: deterministic kernels per block
    rows: list[dict[str, Any]] = []
    measure(args.device, args.n_pgd, args.n_aa, args.batch, rows, worst=args.worst)
    if not args.skip_cpu:
        torch.set_num_threads(os.cpu_count() or 1)
        measure("cpu", args.n_cpu, max(1, args.n_cpu // 4), args.batch, rows)
    exact = shard_exactness(args.device, min(args.n_pgd, 4 * args.batch), args.batch)
    print(exact, flush=True)
    gpu = {r["attack"]: r["examples_per_s"] for r in rows if r["device"] == args.device}
    cpu = {r["attack"]: r["examples_per_s"] for r in rows if r["device"] == "cpu"}
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_threads": torch.get_num_threads()}
    lines = [f"{'device':<6} {'attack':<42} {'n':>5} {'acc':>6} {'s':>8} {'examples/s':>11} {'vs CPU':>8}"]
    for r in rows:
        ratio = f"{r['examples_per_s'] / cpu[r['attack']]:.0f}x" if r["device"] != "cpu" and r["attack"] in cpu else ""
        lines.append(f"{r['device']:<6} {r['attack']:<42} {r['n']:>5} {r['acc']:>6.3f} {r['s']:>8.2f} "
                     f"{r['examples_per_s']:>11.1f} {ratio:>8}")
    lines.append(f"shards on {args.device}: 2 summed == unsharded: {exact['equal']} ({exact['two_shards_summed']})")
    lines.append(str(meta))
    return emit({"meta": meta, "rows": rows, "shard_exactness": exact, "gpu": gpu, "cpu": cpu}, "\n".join(lines), args.out)


if __name__ == "__main__":
    sys.exit(main())
