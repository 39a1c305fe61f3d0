"""SPROUT as a training method (Cheng et al., AAAI 2021, Algorithm 1 with eq. 6 and eq. 8).

gaussian_augment → mixup → dirichlet_targets → soft cross-entropy. θ descends via the
loop's optimizer; β ascends (``maximize=True``) from the gradient that the same backward
left in ``β.grad``, then is projected onto β ≥ β_min. The switches ``use_gaussian``,
``use_mixup`` and ``use_dirichlet`` give the paper's Table 7 ablations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainables.methods.base import Method, StepOutput, check_params
from trainables.registry import METHODS
from trainables.sprout import beta_entropy, dirichlet_targets, gaussian_augment, mixup, soft_cross_entropy


@dataclass
class SproutParams:
    dirichlet_alpha: float = 0.01
    dirichlet_scale: float = 1.0
    mixup_alpha: float = 0.2
    gaussian_delta: float = 0.1
    beta_lr: float | None = None  # None: the model learning rate (SPEC §2 step 5)
    beta_init: str = "random"
    beta_min: float = 1e-3
    use_gaussian: bool = True
    use_mixup: bool = True
    use_dirichlet: bool = True
    clip_gaussian: bool = False

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
            },
        )
        if self.beta_lr is not None and not self.beta_lr > 0:
            raise ValueError(f"sprout.beta_lr must be > 0 or null (= train.lr), got {self.beta_lr!r}")


class Sprout(Method):
    name = "sprout"
    Params = SproutParams

    def __init__(
        self, params: SproutParams | None = None, *, num_classes: int, lr: float = 0.1, seed: int = 0, **_: Any
    ) -> None:
        self.params = p = params or SproutParams()
        self.num_classes = num_classes
        if p.beta_init == "ones":
            beta = torch.ones(num_classes)
        else:
            g = torch.Generator().manual_seed(seed)
            beta = 0.1 + 0.9 * torch.rand(num_classes, generator=g)
        self.beta = nn.Parameter(beta.clamp_min(p.beta_min))
        # foreach=False: one small tensor, and the per-tensor loop is the cheaper path for it
        self.beta_optimizer = torch.optim.SGD([self.beta], lr=p.beta_lr or lr, maximize=True, foreach=False)

    def to(self, device: torch.device | str) -> Sprout:
        with torch.no_grad():
            self.beta.data = self.beta.data.to(device)
        return self

    def targets(self, y_soft: Tensor) -> Tensor:
        p = self.params
        if not p.use_dirichlet:
            return y_soft
        return dirichlet_targets(y_soft, self.beta, p.dirichlet_alpha, p.dirichlet_scale)

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        p = self.params
        y_soft = one_hot(y, self.num_classes, x.dtype)
        if p.use_gaussian:
            x = gaussian_augment(x, p.gaussian_delta, clip=p.clip_gaussian)
        if p.use_mixup:
            x, y_soft, _ = mixup(x, y_soft, p.mixup_alpha)
        logits = model(x)
        loss = soft_cross_entropy(logits, self.targets(y_soft))
        return StepOutput(loss, logits, y_soft.argmax(1))

    def after_step(self) -> None:
        if not self.params.use_dirichlet or self.beta.grad is None:
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
            self.beta.clamp_(min=self.params.beta_min)

    def epoch_metrics(self) -> dict[str, float]:
        return {"sprout/beta_entropy": beta_entropy(self.beta)}

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
