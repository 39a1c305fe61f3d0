"""Projected gradient descent in ℓ∞ (Madry et al. 2018), shared by training and evaluation.

One implementation serves PGD-AT, the evaluation suite (PGD-k, C&W-ℓ∞ = PGD on the
Carlini–Wagner margin loss) and random-targeted PGD for ImageNet. Every attack states the
BatchNorm mode it runs the model in (``bn_mode``) and restores the caller's mode afterwards.
Inputs live in [0, 1]; iterates never leave the ε-ball nor [0, 1].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BNMode = Literal["eval", "train"]


@contextlib.contextmanager
def bn_mode(model: nn.Module, mode: BNMode) -> Iterator[nn.Module]:
    """Run ``model`` in the stated BatchNorm/Dropout mode, then restore the caller's mode."""
    if mode not in ("eval", "train"):
        raise ValueError(f"bn_mode must be 'eval' or 'train', got {mode!r}")
    was_training = model.training
    model.train(mode == "train")
    try:
        yield model
    finally:
        model.train(was_training)


def cw_margin_loss(logits: Tensor, y: Tensor, kappa: float = 0.0) -> Tensor:
    """Per-example C&W objective min(max_{j≠y} z_j − z_y, κ) (Carlini & Wagner 2017, f₆), to maximise.

    Still-correct examples (negative margin) get the full margin gradient; an example stops
    being pushed once it is misclassified with confidence κ.
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (other - true).clamp_max(kappa)


def _per_example_loss(logits: Tensor, y: Tensor, loss: str, targeted: bool) -> Tensor:
    if loss == "ce":
        ce = F.cross_entropy(logits.float(), y, reduction="none")
        return -ce if targeted else ce
    if loss == "cw":
        m = cw_margin_loss(logits.float(), y)
        return -m if targeted else m
    raise ValueError(f"PGD loss must be 'ce' or 'cw', got {loss!r}")


KEEP_RULES = ("first_fooled", "last")


def pgd_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    restarts: int = 1,
    loss: str = "ce",
    targeted: bool = False,
    bn: BNMode = "eval",
    generator: torch.Generator | None = None,
    keep: str = "first_fooled",
    true_labels: Tensor | None = None,
) -> Tensor:
    """ℓ∞ PGD. Returns x_adv; with ``restarts`` > 1 keeps, per example, the worst case found.

    ``targeted``: ``y`` are target labels and the attack minimises their loss.
    "Fooled" means the prediction differs from the true label: ``true_labels`` when given
    (what a targeted evaluation scores), else ``y`` (untargeted) or, for a targeted attack
    without true labels, the prediction hits the target.
    ``keep``: ``first_fooled`` (evaluation) returns, per example, the first iterate (random
    start included) that fooled the model, since later steps may climb the loss and yet
    return to the right class; examples never fooled get their last iterate. ``last``
    returns the last iterate (what the training baselines' anchor repositories use).
    Across restarts a fooling restart wins, then the higher loss.
    """
    if eps < 0 or step_size < 0 or steps < 0 or restarts < 1:
        raise ValueError(
            f"PGD needs eps >= 0, step_size >= 0, steps >= 0, restarts >= 1; "
            f"got eps={eps}, step_size={step_size}, steps={steps}, restarts={restarts}"
        )
    if keep not in KEEP_RULES:
        raise ValueError(f"PGD keep must be one of {list(KEEP_RULES)}, got {keep!r}")
    # Attack the bare module: a DistributedDataParallel wrapper must not see these
    # input-gradient passes (they would leave its gradient reduction half-prepared).
    model = getattr(model, "module", model)
    x = x.detach()
    if eps == 0 or steps == 0 and not random_start:
        return x.clone()
    first = keep == "first_fooled"

    def fooled(logits: Tensor) -> Tensor:
        pred = logits.argmax(1)
        if true_labels is not None:
            return pred != true_labels
        return pred == y if targeted else pred != y

    def rows(mask: Tensor) -> Tensor:
        return mask.view(-1, *([1] * (x.ndim - 1)))

    best = x.clone()
    best_score = torch.full((x.shape[0],), float("-inf"), device=x.device)
    with bn_mode(model, bn):
        for _ in range(restarts):
            if random_start:
                u = torch.rand(x.shape, generator=generator, device="cpu" if generator is not None else x.device)
                delta = (u.to(x.device, x.dtype) * 2 - 1) * eps
                x_adv = (x + delta).clamp(0.0, 1.0)
            else:
                x_adv = x.clone()
            found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            kept = x_adv.clone() if first else x_adv
            for _ in range(steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv)
                if first:  # this forward scores the current iterate too: no extra pass
                    with torch.no_grad():
                        newly = fooled(logits.detach()) & ~found
                        kept = torch.where(rows(newly), x_adv.detach(), kept)
                        found |= newly
                obj = _per_example_loss(logits, y, loss, targeted).sum()
                (grad,) = torch.autograd.grad(obj, x_adv)
                with torch.no_grad():
                    x_adv = x_adv + step_size * grad.sign()
                    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
            x_adv = x_adv.detach()
            if restarts == 1 and not first:
                return x_adv
            with torch.no_grad():
                logits = model(x_adv)
                out = torch.where(rows(found), kept, x_adv) if first else x_adv
                wrong = found | fooled(logits)
                if restarts == 1:
                    return out
                score = _per_example_loss(logits, y, loss, targeted) + 1e6 * wrong.float()
                better = score > best_score
                best[better] = out[better]
                best_score = torch.where(better, score, best_score)
    return best
