"""Carlini–Wagner attacks (Carlini & Wagner 2017, "Towards evaluating the robustness of NNs").

- C&W-ℓ∞: the shared PGD-ℓ∞ (``pgd_linf``) on the C&W margin loss max_{j≠y} z_j − z_y
  (the paper's Appendix, Fig. 6).
- C&W-ℓ2: minimise ‖x' − x‖²₂ + c·max(z_y − max_{j≠y} z_j, −κ) over x' = (tanh(w) + 1)/2
  (the change of variables keeps x' in [0, 1]) with Adam, and binary-search c per example
  (the paper's setting: 10 search steps × 1000 iterations). Every example keeps the
  smallest-ℓ2 misclassified point found over all search steps, so accuracy at an ℓ2 budget b
  counts an example as robust iff no adversarial example with ℓ2 ≤ b was found.

Everything is batched: the per-example constants live in a tensor, never in a Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.attacks.pgd import BNMode, bn_mode, pgd_linf
from trainables.registry import ATTACKS


def cw_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    bn: BNMode = "eval",
    generator: torch.Generator | None = None,
) -> Tensor:
    """C&W-ℓ∞: PGD-ℓ∞ on the C&W margin min(max_{j≠y} z_j − z_y, 0); step 2.5·ε/steps unless given."""
    ss = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    return pgd_linf(model, x, y, eps=eps, step_size=ss, steps=steps, restarts=restarts,
                    random_start=random_start, loss="cw", bn=bn, generator=generator)


@dataclass
class CWL2Result:
    """Minimal-ℓ2 adversarial examples of one batch.

    ``l2[i]`` is the smallest ℓ2 distance of a misclassified point found for example i:
    0 when the clean input is already misclassified, +inf when none was found (then
    ``x_adv[i]`` is the clean input).
    """

    x: Tensor
    y: Tensor
    x_adv: Tensor
    l2: Tensor

    @property
    def found(self) -> Tensor:
        return torch.isfinite(self.l2)

    def robust_at(self, budget: float) -> Tensor:
        """Per-example bool: no adversarial example with ℓ2 ≤ ``budget`` was found."""
        return ~(self.l2 <= budget)

    def correct_at(self, budgets: Sequence[float]) -> dict[float, int]:
        """Robust-example counts at each ℓ2 budget (counts, so shards add up exactly)."""
        return {float(b): int(self.robust_at(float(b)).sum()) for b in budgets}

    def accuracy_at(self, budgets: Sequence[float]) -> dict[float, float]:
        n = max(int(self.y.shape[0]), 1)
        return {b: c / n for b, c in self.correct_at(budgets).items()}


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """z_y − max_{j≠y} z_j (> 0: still classified correctly)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return true - other


def cw_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    search_steps: int = 10,
    max_iter: int = 1000,
    lr: float = 0.01,
    initial_const: float = 1e-3,
    kappa: float = 0.0,
    abort_early: bool = True,
    bn: BNMode = "eval",
) -> CWL2Result:
    """Batched C&W-ℓ2 with a per-example binary search over c.

    Deterministic (no random start): the first k search steps of a run with more steps are
    computed exactly as in a run with k steps, so more search steps can only shrink the
    minimal ℓ2 found.
    """
    if search_steps < 1 or max_iter < 0 or lr <= 0 or initial_const <= 0:
        raise ValueError(
            f"C&W-ℓ2 needs search_steps >= 1, max_iter >= 0, lr > 0, initial_const > 0; got "
            f"search_steps={search_steps}, max_iter={max_iter}, lr={lr}, initial_const={initial_const}"
        )
    x = x.detach()
    n = x.shape[0]
    dims = tuple(range(1, x.ndim))
    dev = x.device
    lower = torch.zeros(n, device=dev)
    upper = torch.full((n,), 1e10, device=dev)
    const = torch.full((n,), float(initial_const), device=dev)
    best_l2 = torch.full((n,), float("inf"), device=dev)
    best_adv = x.clone()
    # atanh of the clean image, squeezed away from ±1 so it stays finite
    w0 = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    with bn_mode(model, bn):
        with torch.no_grad():
            clean_wrong = _margin(model(x), y) <= 0
        best_l2[clean_wrong] = 0.0
        for _ in range(search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr)
            succeeded = clean_wrong.clone()
            prev = math.inf
            check_every = max(max_iter // 10, 1)
            for it in range(max_iter):
                x_adv = (torch.tanh(w) + 1) / 2
                logits = model(x_adv)
                l2sq = (x_adv - x).pow(2).sum(dims)
                margin = _margin(logits.float(), y)
                per_ex = l2sq + const * (margin + kappa).clamp_min(0)
                loss = per_ex.sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    # score the iterate the loss was computed at (before the step)
                    adv_now = margin <= -kappa if kappa > 0 else margin < 0
                    l2 = l2sq.sqrt()
                    improved = adv_now & (l2 < best_l2)
                    best_l2 = torch.where(improved, l2, best_l2)
                    best_adv[improved] = x_adv.detach()[improved]
                    succeeded |= adv_now
                if abort_early and (it + 1) % check_every == 0:
                    cur = float(loss.detach())
                    if cur > prev * 0.9999:
                        break
                    prev = cur
            with torch.no_grad():
                # binary search: success → try a smaller c; failure → a larger one (×10 until bracketed)
                upper = torch.where(succeeded, torch.minimum(upper, const), upper)
                lower = torch.where(succeeded, lower, torch.maximum(lower, const))
                bracketed = upper < 1e9
                const = torch.where(bracketed, (lower + upper) / 2, const * 10)
    best_adv = best_adv.clamp(0.0, 1.0)
    return CWL2Result(x=x, y=y, x_adv=best_adv, l2=best_l2)


def cw_l2_robust_counts(result: CWL2Result, budgets: Sequence[float]) -> dict[float, int]:
    """Robust counts at each ℓ2 budget (a convenience alias of ``CWL2Result.correct_at``)."""
    return result.correct_at(budgets)


@ATTACKS.register("cw_linf")
def cw_linf_attack(eps: float = 8 / 255, steps: int = 20, step_size: float | None = None, restarts: int = 1,
                   bn: BNMode = "eval"):
    """C&W-ℓ∞ as a closure (model, x, y) → x_adv."""

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return cw_linf(model, x, y, eps=eps, steps=steps, step_size=step_size, restarts=restarts, bn=bn)

    return attack


@ATTACKS.register("cw_l2")
def cw_l2_attack(budget: float = 0.5, search_steps: int = 10, max_iter: int = 1000, lr: float = 0.01,
                 initial_const: float = 1e-3, bn: BNMode = "eval"):
    """C&W-ℓ2 as a closure: the minimal-ℓ2 adversarial example if its ℓ2 ≤ ``budget``, else the clean input."""

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        res = cw_l2(model, x, y, search_steps=search_steps, max_iter=max_iter, lr=lr, initial_const=initial_const, bn=bn)
        keep = (res.l2 <= budget).view(-1, *([1] * (x.ndim - 1)))
        return torch.where(keep, res.x_adv, x.detach())

    return attack
