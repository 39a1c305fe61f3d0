"""SPROUT as a training method (Cheng et al., AAAI 2021, Algorithm 1 with eq. 6 and eq. 8).

gaussian_augment → mixup → dirichlet_targets → soft cross-entropy. θ descends via the
loop's optimizer; β ascends (``maximize=True``) from the gradient that the same backward
left in ``β.grad``, then is projected onto β ≥ max(β_min, MIN_CONCENTRATION/(s·α)) (so the
sampler's concentration floor never binds), with γ_β following the model's lr schedule. The
switches ``use_gaussian``, ``use_mixup``, ``use_dirichlet`` (and ``uniform_smoothing``) give the
paper's Table 7 ablations; ``target_mix``, ``beta_update``, ``theta_steps``, ``beta_momentum``
and ``beta_weight_decay`` reproduce the authors' released code (configs/sprout_reference_code.yaml).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainables.methods.base import Method, StepOutput, check_params
from trainables.registry import METHODS
from trainables.sprout import (
    beta_entropy,
    beta_lower_bound,
    dirichlet_targets,
    gaussian_augment,
    mixup,
    sample_beta,
    soft_cross_entropy,
    uniform_smooth,
)


@dataclass
class SproutParams:
    dirichlet_alpha: float = 0.01
    dirichlet_scale: float = 1.0
    mixup_alpha: float = 0.2
    gaussian_delta: float = 0.1
    beta_lr: float | None = None  # None: the model learning rate (SPEC §2 step 5), schedule included
    beta_init: str = "random"
    beta_min: float = 1e-3  # β is projected onto max(β_min, MIN_CONCENTRATION/(s·α)) (beta_lower_bound)
    use_gaussian: bool = True
    use_mixup: bool = True
    use_dirichlet: bool = True
    # Table 7's uniform-LS row as a SPROUT ablation: with use_dirichlet off, ỹ = (1−α)y + α/K (same α)
    uniform_smoothing: bool = False
    clip_gaussian: bool = False
    # The authors' released code (IBM/SPROUT main_cus.py), each behind a switch (defaults: eq. 6):
    # "label": one Dirichlet on the mixed label y_mix (eq. 6); "endpoints": one per Mixup endpoint,
    # λ·CE(Dir(c(y_a))) + (1−λ)·CE(Dir(c(y_b))) (same mean, more variance).
    target_mix: str = "label"
    # "joint": β ascends on the training loss's own gradient (eq. 8); "clean_pass": after the θ-steps
    # of a minibatch, a separate pass on the clean batch (no noise, no Mixup) gives β's gradient.
    beta_update: str = "joint"
    theta_steps: int = 1  # θ-steps per minibatch, each with fresh noise and Mixup (authors: 3)
    beta_momentum: float = 0.0  # authors: 0.9
    beta_weight_decay: float = 0.0  # authors: 5e-4

    def __post_init__(self) -> None:
        check_params(
            "sprout",
            self,
            {
                "dirichlet_alpha": ("unit", None),
                "dirichlet_scale": ("gt", 0.0),
                "mixup_alpha": ("gt", 0.0),
                "gaussian_delta": ("ge", 0.0),
                "beta_init": ("in", ("random", "ones")),
                "beta_min": ("gt", 0.0),
                "target_mix": ("in", TARGET_MIX),
                "beta_update": ("in", BETA_UPDATES),
                "theta_steps": ("ge", 1),
                "beta_momentum": ("ge", 0.0),
                "beta_weight_decay": ("ge", 0.0),
            },
        )
        if self.beta_lr is not None and not self.beta_lr > 0:
            raise ValueError(f"sprout.beta_lr must be > 0 or null (= train.lr), got {self.beta_lr!r}")
        if self.uniform_smoothing and self.use_dirichlet:
            raise ValueError("sprout.uniform_smoothing replaces the Dirichlet: it needs sprout.use_dirichlet: false")
        if self.beta_momentum >= 1:
            raise ValueError(f"sprout.beta_momentum must be in [0, 1), got {self.beta_momentum!r}")


TARGET_MIX = ("label", "endpoints")
BETA_UPDATES = ("joint", "clean_pass")


def sprout_loss(
    model: nn.Module, x: Tensor, y: Tensor, beta: Tensor, p: SproutParams, num_classes: int, *,
    noise: Tensor | None = None, lam: float | None = None, perm: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, logits, hard labels) of one SPROUT step; randomness injectable (noise, λ, π).

    Draws in this order when not given: Gaussian noise, λ, π, then the Dirichlet sample(s)
    (y_a's before y_b's with ``target_mix: endpoints``) from torch's global generator.
    """
    y_soft = one_hot(y, num_classes, x.dtype)
    if p.use_gaussian:
        x = gaussian_augment(x, p.gaussian_delta, noise=noise, clip=p.clip_gaussian)
    endpoints = p.target_mix == "endpoints" and p.use_mixup and p.use_dirichlet
    y_a = y_b = y_soft
    if p.use_mixup:
        if endpoints and lam is None:
            lam = sample_beta(p.mixup_alpha)
        if endpoints and perm is None:
            perm = torch.randperm(x.shape[0], device=x.device)
        if lam is None and perm is None:
            x, y_mix, lam = mixup(x, y_soft, p.mixup_alpha)
        else:
            x, y_mix, lam = mixup(x, y_soft, p.mixup_alpha, lam=lam, perm=perm)
        if endpoints:
            y_b = y_soft[perm]
    else:
        y_mix = y_soft
    logits = model(x)
    if endpoints:
        assert lam is not None
        loss = lam * soft_cross_entropy(logits, smoothed_targets(y_a, beta, p, num_classes)) + (
            1.0 - lam) * soft_cross_entropy(logits, smoothed_targets(y_b, beta, p, num_classes))
    else:
        loss = soft_cross_entropy(logits, smoothed_targets(y_mix, beta, p, num_classes))
    return loss, logits, y_mix.argmax(1)


def smoothed_targets(y_soft: Tensor, beta: Tensor, p: SproutParams, num_classes: int) -> Tensor:
    """ỹ: Dirichlet(s·((1−α)y + αβ)) (eq. 6), uniform (1−α)y + α/K (ablation), or y itself."""
    if p.use_dirichlet:
        return dirichlet_targets(y_soft, beta, p.dirichlet_alpha, p.dirichlet_scale)
    if p.uniform_smoothing:
        return uniform_smooth(y_soft, p.dirichlet_alpha)
    return y_soft


class Sprout(Method):
    name = "sprout"
    Params = SproutParams

    def __init__(
        self, params: SproutParams | None = None, *, num_classes: int, lr: float = 0.1, seed: int = 0, **_: Any
    ) -> None:
        self.params = p = params or SproutParams()
        self.num_classes = num_classes
        self.replays = p.theta_steps
        self.beta_floor = beta_lower_bound(p.beta_min, p.dirichlet_alpha, p.dirichlet_scale)
        if p.beta_init == "ones":
            beta = torch.ones(num_classes)
        else:
            g = torch.Generator().manual_seed(seed)
            beta = 0.1 + 0.9 * torch.rand(num_classes, generator=g)
        self.beta = nn.Parameter(beta.clamp_min(self.beta_floor))
        # γ_β follows the model's schedule: γ_β(epoch) = beta_lr · lr(epoch)/lr (= lr(epoch) by default)
        self.base_lr = lr
        self.beta_lr = p.beta_lr or lr
        # foreach=False: one small tensor, and the per-tensor loop is the cheaper path for it
        self.beta_optimizer = torch.optim.SGD(
            [self.beta], lr=self.beta_lr, momentum=p.beta_momentum, weight_decay=p.beta_weight_decay,
            maximize=True, foreach=False,
        )
        self._clean: tuple[nn.Module, Tensor, Tensor] | None = None
        self._replay = 0

    def to(self, device: torch.device | str) -> Sprout:
        with torch.no_grad():
            self.beta.data = self.beta.data.to(device)
        return self

    def set_lr(self, lr: float) -> None:
        new = lr if self.params.beta_lr is None else self.params.beta_lr * lr / self.base_lr
        for g in self.beta_optimizer.param_groups:
            g["lr"] = new

    def targets(self, y_soft: Tensor) -> Tensor:
        return smoothed_targets(y_soft, self.beta, self.params, self.num_classes)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        p = self.params
        clean_pass = p.beta_update == "clean_pass" and p.use_dirichlet
        beta = self.beta.detach() if clean_pass else self.beta
        loss, logits, labels = sprout_loss(model, x, y, beta, p, self.num_classes)
        if clean_pass:
            self._clean = (model, x, y)  # for β's own pass in after_step (the authors' order)
        return StepOutput(loss, logits, labels)

    def after_step(self) -> None:
        p = self.params
        if not p.use_dirichlet:
            return
        if p.beta_update == "clean_pass":
            self._replay += 1
            clean, self._clean = self._clean, None
            if self._replay % p.theta_steps or clean is None:
                return
            model, x, y = clean
            with torch.no_grad():
                logits = getattr(model, "module", model)(x)  # the updated model, its current mode
            target = dirichlet_targets(one_hot(y, self.num_classes, logits.dtype), self.beta, p.dirichlet_alpha,
                                       p.dirichlet_scale)
            (self.beta.grad,) = torch.autograd.grad(soft_cross_entropy(logits, target), [self.beta])
        if self.beta.grad is None:
            return
        if dist.is_available() and dist.is_initialized():
            # β is not a DDP parameter: average its gradient across workers ourselves.
            dist.all_reduce(self.beta.grad)
            self.beta.grad /= dist.get_world_size()
        # through the optimizer's own step (not a hand-written update), so its step hooks and
        # any LR scheduler attached to it keep working
        self.beta_optimizer.step()
        self.beta_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.beta.clamp_(min=self.beta_floor)

    def epoch_metrics(self) -> dict[str, float]:
        return {"sprout/beta_entropy": beta_entropy(self.beta),
                "sprout/beta_lr": float(self.beta_optimizer.param_groups[0]["lr"])}

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta.detach().cpu().clone(), "beta_optimizer": self.beta_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.beta.copy_(state["beta"].to(self.beta.device))
        self.beta_optimizer.load_state_dict(state["beta_optimizer"])


def one_hot(y: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """Float one-hot rows; a scatter, without ``F.one_hot``'s host-side range check."""
    return torch.zeros(y.shape[0], num_classes, dtype=dtype, device=y.device).scatter_(1, y.unsqueeze(1), 1.0)


METHODS.register("sprout")(Sprout)
