"""Adversarial-training baselines with their anchor repositories' defaults (SPEC §2).

- pgd_at: Madry et al. 2018 — ε = 8/255, 7 steps of 2/255, random start, train on x_adv only.
- trades: Zhang et al. 2019 — CE(f(x), y) + β·KL(f(x) ‖ f(x_adv)); inner max of the KL from
  x + 0.001·N(0, I), 10 steps of 0.007 in ε = 0.031.
- free_at: Shafahi et al. 2019 — each minibatch replayed m times; δ carried across
  replays and minibatches, updated by ε·sign(∇_δ) from the same backward as θ.
- fgsm_rs: Wong et al. 2020 — δ ~ U(−ε, ε), one FGSM step of 10/255, projected to ε.
Each states the BatchNorm mode of its attack generation (``bn_mode``); the θ update always
runs in train mode. Budgets are validated in pixel units: 0 < ε ≤ 1, 0 < step ≤ ε (FGSM-RS:
≤ 2ε, Wong et al.'s step is 1.25ε), step counts ≥ 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.attacks.pgd import bn_mode, pgd_linf
from trainables.methods.base import Method, StepOutput, check_params
from trainables.registry import METHODS

BN_MODES = ("eval", "train")


@dataclass
class PGDATParams:
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 7
    random_start: bool = True
    bn_mode: str = "eval"

    def __post_init__(self) -> None:
        check_params(
            "pgd_at",
            self,
            {"eps": ("eps", None), "step_size": ("step", "eps"), "steps": ("ge", 1), "bn_mode": ("in", BN_MODES)},
        )


class PGDAT(Method):
    name = "pgd_at"
    Params = PGDATParams

    def __init__(self, params: PGDATParams | None = None, **_: Any) -> None:
        self.params = params or PGDATParams()

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        p = self.params
        x_adv = pgd_linf(
            model, x, y, eps=p.eps, step_size=p.step_size, steps=p.steps, random_start=p.random_start, bn=p.bn_mode,
            keep="last",  # Madry et al. train on the last iterate
        )
        logits = model(x_adv)
        return StepOutput(F.cross_entropy(logits.float(), y), logits, y)


@dataclass
class TradesParams:
    beta: float = 6.0
    eps: float = 0.031
    step_size: float = 0.007
    steps: int = 10
    bn_mode: str = "eval"

    def __post_init__(self) -> None:
        check_params(
            "trades",
            self,
            {
                "beta": ("ge", 0.0),
                "eps": ("eps", None),
                "step_size": ("step", "eps"),
                "steps": ("ge", 1),
                "bn_mode": ("in", BN_MODES),
            },
        )


def trades_adversary(model: nn.Module, x: Tensor, p: TradesParams) -> Tensor:
    """Inner maximisation of KL(f(x) ‖ f(x')) over the ε-ball (Zhang et al. 2019, Alg. 1)."""
    model = getattr(model, "module", model)  # no DDP gradient sync for attack passes
    with bn_mode(model, p.bn_mode):
        with torch.no_grad():
            p_clean = F.softmax(model(x).float(), dim=1)
        x_adv = (x.detach() + 0.001 * torch.randn_like(x)).clamp(0.0, 1.0)
        for _ in range(p.steps):
            x_adv.requires_grad_(True)
            kl = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(kl, x_adv)
            with torch.no_grad():
                x_adv = x_adv + p.step_size * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - p.eps), x + p.eps).clamp(0.0, 1.0)
    return x_adv.detach()


class Trades(Method):
    name = "trades"
    Params = TradesParams

    def __init__(self, params: TradesParams | None = None, **_: Any) -> None:
        self.params = params or TradesParams()

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        p = self.params
        x_adv = trades_adversary(model, x, p) if p.beta > 0 else x
        logits = model(x)
        natural = F.cross_entropy(logits.float(), y)
        if p.beta == 0:
            return StepOutput(natural, logits, y)
        robust = F.kl_div(
            F.log_softmax(model(x_adv).float(), dim=1), F.softmax(logits.float(), dim=1), reduction="batchmean"
        )
        return StepOutput(natural + p.beta * robust, logits, y, {"train/trades_kl": float(robust.detach())})


@dataclass
class FreeATParams:
    eps: float = 8 / 255
    replays: int = 8
    bn_mode: str = "train"

    def __post_init__(self) -> None:
        check_params("free_at", self, {"eps": ("eps", None), "replays": ("ge", 1), "bn_mode": ("in", BN_MODES)})


class FreeAT(Method):
    name = "free_at"
    Params = FreeATParams

    def __init__(self, params: FreeATParams | None = None, **_: Any) -> None:
        self.params = params or FreeATParams()
        self.replays = self.params.replays
        self.epoch_divisor = self.params.replays
        self.delta: Tensor | None = None
        self._live: Tensor | None = None
        self._delta_grad: Tensor | None = None

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        if self.delta is not None and self.delta.device != x.device:
            self.delta = self.delta.to(x.device)  # e.g. restored from a (CPU) checkpoint
        if self.delta is None or self.delta.shape[1:] != x.shape[1:]:
            self.delta = torch.zeros_like(x[:1]).expand_as(x).clone()
        if self.delta.shape[0] < x.shape[0]:
            pad = torch.zeros_like(x[: x.shape[0] - self.delta.shape[0]])
            self.delta = torch.cat([self.delta, pad])
        self._live = self.delta[: x.shape[0]].clone().requires_grad_(True)
        if self.params.bn_mode == "train":
            # Shafahi et al.: one forward/backward gives both θ's and δ's gradients
            logits = model((x + self._live).clamp(0.0, 1.0))
            self._delta_grad = None
        else:
            # bn_mode eval is the attack's mode only: δ's gradient comes from an eval-mode pass,
            # and θ still trains in train mode like every other method (one extra pass)
            bare = getattr(model, "module", model)
            with bn_mode(bare, "eval"):
                adv = F.cross_entropy(bare((x + self._live).clamp(0.0, 1.0)).float(), y)
            (self._delta_grad,) = torch.autograd.grad(adv, self._live)
            logits = model((x + self._live.detach()).clamp(0.0, 1.0))
        return StepOutput(F.cross_entropy(logits.float(), y), logits, y)

    def after_step(self) -> None:
        live, self._live = self._live, None
        grad = self._delta_grad if self._delta_grad is not None else (live.grad if live is not None else None)
        self._delta_grad = None
        if live is None or grad is None or self.delta is None:
            return
        eps = self.params.eps
        with torch.no_grad():
            self.delta[: live.shape[0]] = (live + eps * grad.sign()).clamp(-eps, eps)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.delta is None else {"delta": self.delta.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta = state.get("delta")


@dataclass
class FGSMRSParams:
    eps: float = 8 / 255
    step_size: float = 10 / 255
    bn_mode: str = "train"

    def __post_init__(self) -> None:
        check_params(
            "fgsm_rs", self, {"eps": ("eps", None), "step_size": ("step", ("eps", 2.0)), "bn_mode": ("in", BN_MODES)}
        )


class FGSMRS(Method):
    name = "fgsm_rs"
    Params = FGSMRSParams

    def __init__(self, params: FGSMRSParams | None = None, **_: Any) -> None:
        self.params = params or FGSMRSParams()

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        p = self.params
        x_adv = pgd_linf(
            model, x, y, eps=p.eps, step_size=p.step_size, steps=1, random_start=True, bn=p.bn_mode, keep="last"
        )
        logits = model(x_adv)
        return StepOutput(F.cross_entropy(logits.float(), y), logits, y)


METHODS.register("pgd_at")(PGDAT)
METHODS.register("trades")(Trades)
METHODS.register("free_at")(FreeAT)
METHODS.register("fgsm_rs")(FGSMRS)
