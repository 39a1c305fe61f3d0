"""Attacks. Training uses ``pgd_linf`` (one implementation, explicit BatchNorm mode)."""

from trainables.attacks import autoattack, cw, invariance, masking, targeted, transfer  # noqa: F401  (register)
from trainables.attacks.pgd import bn_mode, cw_margin_loss, pgd_linf
from trainables.registry import ATTACKS


@ATTACKS.register("pgd")
def pgd(eps: float = 8 / 255, steps: int = 20, step_size: float | None = None, restarts: int = 1,
        random_start: bool = True, loss: str = "ce", bn: str = "eval"):
    """PGD-ℓ∞ as a closure (model, x, y) → x_adv; step size 2.5·ε/steps by default."""
    ss = 2.5 * eps / max(steps, 1) if step_size is None else step_size

    def attack(model, x, y):
        return pgd_linf(model, x, y, eps=eps, step_size=ss, steps=steps, restarts=restarts,
                        random_start=random_start, loss=loss, bn=bn)

    return attack


@ATTACKS.register("fgsm_rs")
def fgsm_rs(eps: float = 8 / 255, step_size: float = 10 / 255, bn: str = "train"):
    """Wong et al.'s FGSM with a uniform random start (the fgsm_rs training attack)."""
    return pgd(eps=eps, steps=1, step_size=step_size, random_start=True, bn=bn)


__all__ = ["ATTACKS", "bn_mode", "cw_margin_loss", "pgd_linf"]
