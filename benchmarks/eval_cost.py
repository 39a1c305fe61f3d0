"""Seconds per 1,000 examples of PGD-20 and of AutoAttack (standard) on this CPU (issue 4).

Models: the digits small CNN (real 8×8 digits, trained here in seconds) and VGG-16 on
synthetic 32×32 RGB inputs (randomly initialised: training it on CPU is out of scope).

PGD-20's cost does not depend on the model's robustness (20 forward+backward passes per
example). AutoAttack's does: each stage only attacks the points that are still robust,
and Square keeps querying a point until it breaks (5,000 queries at most). So it is
reported as
- "typical": the standard version at the given ε on the trained digits models (the
  points a natural model keeps at that ε go through all four stages; see the acc column);
- "worst case": the standard version at ε = 0, where no point can ever be broken, so every
  stage runs in full on every example: the cost for a perfectly robust model, an upper
  bound. Per-stage seconds are printed too.
For VGG-16 (random weights, BatchNorm statistics taken from the data) the labels are the
model's own clean predictions, so every example is attacked; a random network's
"typical" AutoAttack cost would mean nothing, so only PGD-20 and the upper bound are given.

Times are measured with one torch thread (``--threads``) as wall-clock and as process CPU
seconds; on a machine shared with other jobs the CPU seconds are the attack's own cost.
Runs on a few examples (``--n-digits``, ``--n-vgg``, ``--n-vgg-pgd``) are extrapolated
linearly to 1,000 (small batches make the per-example cost, if anything, pessimistic).

    python benchmarks/eval_cost.py --n-digits 100 --n-vgg 2 --n-vgg-pgd 16 --out eval_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables import DATASETS, MODELS  # noqa: E402
from trainables.attacks.autoattack import STANDARD_ATTACKS, autoattack  # noqa: E402
from trainables.attacks.pgd import pgd_linf  # noqa: E402
from trainables.loop import OptimConfig, fit  # noqa: E402
from trainables.methods import build_method  # noqa: E402


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def pgd20(model: nn.Module, x: Tensor, y: Tensor, eps: float, batch: int = 256) -> float:
    correct = 0
    for i in range(0, len(y), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        adv = pgd_linf(model, xb, yb, eps=eps, step_size=2.5 * eps / 20, steps=20,
                       generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            correct += int((model(adv).argmax(1) == yb).sum())
    return correct / len(y)


def measure(name: str, model: nn.Module, x: Tensor, y: Tensor, eps: float, rows: list[dict[str, Any]],
            typical: bool = True, worst: bool = True, n_aa: int | None = None) -> None:
    """PGD-20 on all of (x, y); AutoAttack on the first ``n_aa`` examples."""
    n = len(y)
    acc, w, c = timed(lambda: pgd20(model, x, y, eps))
    rows.append({"model": name, "attack": "PGD-20", "eps": eps, "n": n, "acc": acc, "wall_s_per_1k": w * 1000 / n,
                 "cpu_s_per_1k": c * 1000 / n})
    print(rows[-1], flush=True)
    n = min(n_aa or n, n)
    x, y = x[:n], y[:n]
    per = 1000.0 / n
    if typical:
        r, w, c = timed(lambda: autoattack(model, x, y, eps=eps, seed=0, batch_size=n))
        rows.append({"model": name, "attack": "AutoAttack standard (typical)", "eps": eps, "n": n,
                     "acc": r.robust_count / n, "wall_s_per_1k": w * per, "cpu_s_per_1k": c * per})
        print(rows[-1], flush=True)
    if worst:
        stages = {}
        tw = tc = 0.0
        for stage in STANDARD_ATTACKS:
            _, w, c = timed(lambda s=stage: autoattack(model, x, y, eps=0.0, attacks_to_run=[s], seed=0, batch_size=n))
            stages[stage] = round(c * per, 1)
            tw, tc = tw + w, tc + c
        rows.append({"model": name, "attack": "AutoAttack standard (worst case, ε=0)", "eps": 0.0, "n": n, "acc": None,
                     "wall_s_per_1k": tw * per, "cpu_s_per_1k": tc * per, "cpu_s_per_1k_by_stage": stages})
        print(rows[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-digits", type=int, default=100)
    ap.add_argument("--n-vgg", type=int, default=2, help="VGG-16 examples for AutoAttack")
    ap.add_argument("--n-vgg-pgd", type=int, default=16, help="VGG-16 examples for PGD-20")
    ap.add_argument("--digits-eps", type=float, default=0.1, help="digits pixels are k/16: 8/255 is below one level")
    ap.add_argument("--vgg-eps", type=float, default=8 / 255)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-vgg", action="store_true")
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []

    x, y = DATASETS["digits"](split="test").tensors()
    x, y = x[:args.n_digits], y[:args.n_digits]
    for method, params, epochs in (("natural", {}, 6), ("pgd_at", {"eps": args.digits_eps, "step_size": args.digits_eps / 4}, 4)):
        torch.manual_seed(0)
        model = MODELS["small_cnn"](num_classes=10, in_channels=1, mean=(0.305,), std=(0.375,))
        fit(model, build_method(method, params, num_classes=10, lr=0.05), DATASETS["digits"](split="train"), None,
            epochs=epochs, batch_size=64, optim=OptimConfig(lr=0.05), seed=0)
        model.eval()
        measure(f"small_cnn digits ({method})", model, x, y, args.digits_eps, rows, worst=method == "natural")

    if not args.skip_vgg:
        torch.manual_seed(0)
        vgg = MODELS["vgg16"](num_classes=10)
        n = max(args.n_vgg, args.n_vgg_pgd)
        xv, _ = DATASETS["synthetic"](split="test", image_size=32, channels=3, num_samples=5 * max(n, 64)).tensors()
        with torch.no_grad():
            vgg.train()(xv[:64])  # BatchNorm statistics of the data, so the random network reacts to its input
            vgg.eval()
            xv = xv[:n]
            yv = vgg(xv).argmax(1)  # labels = clean predictions: every example is attacked
        # a random network's "typical" AutoAttack cost means nothing: report PGD-20 and the ε = 0 upper bound
        measure("vgg16 synthetic 32x32 (random init)", vgg, xv, yv, args.vgg_eps, rows, typical=False, n_aa=args.n_vgg)

    print()
    print(f"{'model':<40} {'attack':<40} {'ε':>7} {'n':>5} {'acc':>6} {'CPU s/1k':>10} {'wall s/1k':>10}")
    for r in rows:
        acc = "" if r["acc"] is None else f"{r['acc']:.3f}"
        print(f"{r['model']:<40} {r['attack']:<40} {r['eps']:>7.4f} {r['n']:>5} {acc:>6} "
              f"{r['cpu_s_per_1k']:>10.1f} {r['wall_s_per_1k']:>10.1f}")
    for r in rows:
        if "cpu_s_per_1k_by_stage" in r:
            print(f"  {r['model']} worst case, CPU s/1k by stage: {r['cpu_s_per_1k_by_stage']}")
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
            "threads": args.threads, "python": platform.python_version()}
    print(meta)
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
