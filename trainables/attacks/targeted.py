"""Random-targeted PGD-ℓ∞ for ImageNet (the paper's Table 4 and Table 10).

Many ImageNet classes are near-synonyms, so an untargeted attack can "succeed" by moving
to a sibling class; following Athalye, Carlini & Wagner (2018) the attack instead drives
each image towards a class drawn uniformly from the wrong ones, at
ε ∈ {0.005, 0.01, 0.015, 0.02}. Reported accuracy is the fraction still classified as the
true label.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainables.attacks.pgd import BNMode, pgd_linf
from trainables.registry import ATTACKS

IMAGENET_EPS: tuple[float, ...] = (0.005, 0.01, 0.015, 0.02)


def random_wrong_targets(y: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """A target per example, uniform over the K − 1 classes other than its label (seeded)."""
    if num_classes < 2:
        raise ValueError(f"random targets need at least 2 classes, got {num_classes}")
    offset = torch.randint(1, num_classes, y.shape, generator=generator,
                           device="cpu" if generator is not None else y.device)
    return (y + offset.to(y.device)) % num_classes


def targeted_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    num_classes: int | None = None,
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    random_start: bool = True,
    bn: BNMode = "eval",
    generator: torch.Generator | None = None,
    targets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(x_adv, targets): PGD-ℓ∞ minimising the cross-entropy of a random wrong target. It keeps,
    per example, the iterate and restart that reach the target (an attack that aims at targets);
    the evaluation's ``targeted`` robustness instead scores by the true label
    (``trainables.evaluation`` passes ``true_labels`` to ``pgd_linf``)."""
    if targets is None:
        if num_classes is None:
            with torch.no_grad():
                num_classes = int(model(x[:1]).shape[1])
        targets = random_wrong_targets(y, num_classes, generator)
    ss = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    x_adv = pgd_linf(model, x, targets, eps=eps, step_size=ss, steps=steps, restarts=restarts,
                     random_start=random_start, loss="ce", targeted=True, bn=bn, generator=generator)
    return x_adv, targets


@ATTACKS.register("targeted")
def targeted_attack(eps: float = 0.01, steps: int = 20, step_size: float | None = None, restarts: int = 1,
                    seed: int = 0, bn: BNMode = "eval"):
    """Random-targeted PGD as a closure (model, x, y) → x_adv; targets drawn from ``seed`` per call."""
    gen = torch.Generator().manual_seed(seed)

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return targeted_pgd(model, x, y, eps=eps, steps=steps, step_size=step_size, restarts=restarts, bn=bn,
                            generator=gen)[0]

    return attack
