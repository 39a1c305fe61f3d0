"""SPROUT's composable pieces (Cheng et al., "Self-Progressing Robust Training", AAAI 2021).

Per minibatch (paper Algorithm 1, with eq. (6) as the canonical label mixing):
  gaussian_augment  x̃ = x + Δ·N(0, I)                               (Gaussian vicinity)
  mixup             λ ~ Beta(a, a); x_mix = λx̃ + (1−λ)x̃[π]; y_mix likewise  (Mixup vicinity)
  dirichlet_targets ỹ ~ Dirichlet(s·((1−α)·y_mix + α·β))              (eq. 6, reparameterised)
  soft_cross_entropy L = mean_i −Σ_k ỹ_ik log softmax(f(x_mix))_ik    (eq. 4)
θ descends and β ascends on the same L (eq. 8); both gradients come from one backward pass.

Every function takes its randomness as optional arguments (noise, lam, perm, generator)
so tests can inject it; none has side effects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_augment(
    x: Tensor,
    delta: float,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    clip: bool = False,
) -> Tensor:
    """x + delta·N(0, I); no clipping by default (SPEC §2 step 1)."""
    if delta < 0:
        raise ValueError(f"gaussian_delta must be >= 0, got {delta}")
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    out = x + delta * noise
    return out.clamp(0.0, 1.0) if clip else out


def mixup(
    x: Tensor,
    y_soft: Tensor,
    mixup_alpha: float,
    *,
    lam: float | None = None,
    perm: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Mixup (Zhang et al. 2018): λ ~ Beta(a, a), x_mix = λx + (1−λ)x[π], same for labels."""
    if mixup_alpha <= 0:
        raise ValueError(f"mixup_alpha must be > 0, got {mixup_alpha}")
    if lam is None:
        lam = sample_beta(mixup_alpha, generator)
    if perm is None:
        perm = torch.randperm(x.shape[0], generator=generator, device="cpu").to(x.device)
    x_mix = lam * x + (1.0 - lam) * x[perm]
    y_mix = lam * y_soft + (1.0 - lam) * y_soft[perm]
    return x_mix, y_mix, lam


def sample_beta(a: float, generator: torch.Generator | None = None) -> float:
    """λ ~ Beta(a, a) by Jöhnk's method, from uniforms so an injected generator fixes it."""
    while True:
        u, v = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        xx, yy = u ** (1.0 / a), v ** (1.0 / a)
        if 0.0 < xx + yy <= 1.0:
            return xx / (xx + yy)


def dirichlet_concentration(y: Tensor, beta: Tensor, alpha: float, scale: float = 1.0) -> Tensor:
    """c = scale·((1−α)·y + α·β), paper eq. (6) (SPEC §2 step 3)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"dirichlet_alpha must be in [0, 1], got {alpha}")
    if scale <= 0:
        raise ValueError(f"dirichlet_scale must be > 0, got {scale}")
    if beta.ndim != 1 or beta.shape[0] != y.shape[-1]:
        raise ValueError(f"beta must have shape ({y.shape[-1]},), got {tuple(beta.shape)}")
    return scale * ((1.0 - alpha) * y + alpha * beta.to(y.dtype).unsqueeze(0))


# Concentrations far below this make Gamma samples underflow to exactly 0 in float32,
# which turns the implicit-reparameterisation gradient into NaN.
MIN_CONCENTRATION = 1e-4


def dirichlet_targets(y: Tensor, beta: Tensor, alpha: float, scale: float = 1.0) -> Tensor:
    """Reparameterised sample ỹ ~ Dirichlet(scale·((1−α)·y + α·β)); gradients reach ``beta``.

    ``y``: N×K soft labels on the simplex; ``beta``: K positive. Uses torch's implicit
    reparameterisation gradients (Figurnov et al. 2018), as the paper does.
    """
    conc = dirichlet_concentration(y, beta, alpha, scale).clamp_min(MIN_CONCENTRATION)
    # Sampled in float64: tiny concentrations (α·β ≈ 0.01) underflow in float32.
    sample = torch.distributions.Dirichlet(conc.double()).rsample()
    return sample.to(y.dtype)


def uniform_smooth(y: Tensor, alpha: float) -> Tensor:
    """Uniform label smoothing (Szegedy et al. 2016, paper eq. 5): (1−α)·y + α/K."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"label_smoothing.alpha must be in [0, 1], got {alpha}")
    return (1.0 - alpha) * y + alpha / y.shape[-1]


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of −Σ_k t_k log softmax(logits)_k (paper eq. 4)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


def beta_entropy(beta: Tensor) -> float:
    """Entropy (nats) of β normalised to the simplex; log K means uniform."""
    p = beta.detach().double().clamp_min(1e-12)
    p = p / p.sum()
    return float(-(p * p.log()).sum())
