"""Transfer attack (Athalye, Carlini & Wagner 2018; the paper's Table 3).

PGD-ℓ∞ examples are crafted on a *source* model (by default the natural model of the same
comparison) and scored on the target. A defence that resists white-box PGD but falls to
examples transferred from another model is masking its gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainables.attacks.pgd import BNMode, pgd_linf
from trainables.registry import ATTACKS


def transfer_pgd(
    source: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    loss: str = "ce",
    bn: BNMode = "eval",
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD-ℓ∞ examples crafted on ``source`` (score them on any target model); the last iterate,
    not the first that fools the source (a barely-fooling point transfers worse)."""
    ss = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    return pgd_linf(source, x, y, eps=eps, step_size=ss, steps=steps, restarts=restarts,
                    random_start=random_start, loss=loss, bn=bn, generator=generator, keep="last")


def transfer_correct(
    source: nn.Module,
    target: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> int:
    """How many transferred examples the target still classifies correctly (a count)."""
    x_adv = transfer_pgd(source, x, y, eps=eps, steps=steps, step_size=step_size, restarts=restarts, generator=generator)
    was_training = target.training
    target.eval()
    try:
        with torch.no_grad():
            return int((target(x_adv).argmax(1) == y).sum())
    finally:
        target.train(was_training)


@ATTACKS.register("transfer")
def transfer_attack(source: nn.Module, eps: float = 8 / 255, steps: int = 20, step_size: float | None = None,
                    restarts: int = 1, bn: BNMode = "eval"):
    """Transfer as a closure (model, x, y) → x_adv crafted on ``source`` (the target model is not queried)."""

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return transfer_pgd(source, x, y, eps=eps, steps=steps, step_size=step_size, restarts=restarts, bn=bn)

    return attack
