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

import math

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
        # drawn where its generator lives (the model's device by default): no host→device copy,
        # which on a GPU would wait for the queued kernels every step
        where = generator.device if generator is not None else x.device
        perm = torch.randperm(x.shape[0], generator=generator, device=where).to(x.device)
    x_mix = lam * x + (1.0 - lam) * x[perm]
    y_mix = lam * y_soft + (1.0 - lam) * y_soft[perm]
    return x_mix, y_mix, lam


def sample_beta(a: float, generator: torch.Generator | None = None) -> float:
    """λ ~ Beta(a, a) on the host from torch's RNG, so an injected generator fixes it.

    a ≤ 1 (Mixup's usual range; SPROUT's a = 0.2): Jöhnk's method, which accepts with
    probability Γ(a+1)²/Γ(2a+1) ≥ 1/2 there. a > 1, where Jöhnk's acceptance collapses
    (≈ 4 % at a = 4): λ = G₁/(G₁+G₂) with Gᵢ ~ Gamma(a) by Marsaglia–Tsang.
    """
    if not a > 0:
        raise ValueError(f"mixup_alpha must be > 0, got {a}")
    where = generator.device if generator is not None else "cpu"
    if a > 1:
        g1, g2 = _gamma(a, generator, where), _gamma(a, generator, where)
        return g1 / (g1 + g2)
    while True:
        u, v = torch.rand(2, generator=generator, dtype=torch.float64, device=where).tolist()
        xx, yy = u ** (1.0 / a), v ** (1.0 / a)
        if 0.0 < xx + yy <= 1.0:
            return xx / (xx + yy)


def _gamma(a: float, generator: torch.Generator | None, where: str | torch.device) -> float:
    """One Gamma(a, 1) draw, a ≥ 1 (Marsaglia & Tsang 2000; accepts ≥ 95 % of the time)."""
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = float(torch.randn(1, generator=generator, dtype=torch.float64, device=where))
        v = (1.0 + c * x) ** 3
        if v <= 0:
            continue
        u = float(torch.rand(1, generator=generator, dtype=torch.float64, device=where))
        if u > 0 and math.log(u) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v


def dirichlet_concentration(
    y: Tensor, beta: Tensor, alpha: float, scale: float = 1.0, dtype: torch.dtype | None = None
) -> Tensor:
    """c = scale·((1−α)·y + α·β), paper eq. (6) (SPEC §2 step 3), in ``dtype`` (default y's).

    Computed as the K-vector (s·α)·β broadcast-added to (s·(1−α))·y: one N×K operation.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"dirichlet_alpha must be in [0, 1], got {alpha}")
    if scale <= 0:
        raise ValueError(f"dirichlet_scale must be > 0, got {scale}")
    if beta.ndim != 1 or beta.shape[0] != y.shape[-1]:
        raise ValueError(f"beta must have shape ({y.shape[-1]},), got {tuple(beta.shape)}")
    return torch.add(beta.to(dtype or y.dtype) * (scale * alpha), y, alpha=scale * (1.0 - alpha))


# Concentrations far below this make Gamma samples underflow (torch then returns the smallest
# normal double), which makes the implicit-reparameterisation gradient meaningless. The SPROUT
# method keeps β ≥ MIN_CONCENTRATION/(s·α) (``beta_lower_bound``), so in training the floor
# never binds: β's gradient is then exactly torch's ``Dirichlet(c).rsample()`` gradient.
MIN_CONCENTRATION = 1e-4


def beta_lower_bound(beta_min: float, alpha: float, scale: float = 1.0) -> float:
    """Where β is projected: max(β_min, MIN_CONCENTRATION/(s·α)), so that every concentration
    s·((1−α)y + αβ) ≥ s·α·β stays at or above the floor (no β_k is ever absorbed at β_min
    with zero gradient from the rows that put no label mass on k)."""
    if alpha <= 0:
        return beta_min
    # a hair above the exact quotient: β is float32, and s·α·β must not round below the floor
    return max(beta_min, MIN_CONCENTRATION / (scale * alpha) * (1 + 1e-6))


def floored_concentration(y: Tensor, beta: Tensor, alpha: float, scale: float = 1.0) -> Tensor:
    """The float64 concentration that ``dirichlet_targets`` samples from: c floored at
    ``MIN_CONCENTRATION`` (tiny concentrations α·β ≈ 0.01 underflow in float32)."""
    return dirichlet_concentration(y, beta, alpha, scale, torch.float64).clamp_min(MIN_CONCENTRATION)


class _DirichletTargets(torch.autograd.Function):
    """ỹ = Dirichlet(floored_concentration(y, β, α, s)).rsample(), as one autograd node.

    Forward: the same kernel and random stream as ``torch.distributions.Dirichlet(c).rsample()``
    on that concentration, so the samples are bit-identical. Backward: torch's implicit
    reparameterisation gradient (``torch._dirichlet_grad``, as in
    ``torch.distributions.dirichlet._Dirichlet_backward``), carried back to y and β in
    float64; where the floor applies the gradient is straight-through (the gradient at the
    floor, so a tiny β_k still learns which way to move). Above the floor it equals autograd
    through the unfused chain up to float rounding. The incoming gradient is never written
    in place (other branches of the graph may share it). One node instead of the distribution object, its
    argument validation and about ten small autograd nodes: ~0.3–0.5 ms less per step in a
    CPU training step (BENCHMARKS.md).
    """

    @staticmethod
    def forward(ctx, y: Tensor, beta: Tensor, alpha: float, scale: float) -> Tensor:  # type: ignore[override]
        conc = dirichlet_concentration(y, beta, alpha, scale, torch.float64).clamp_min_(MIN_CONCENTRATION)
        sample = torch._sample_dirichlet(conc)
        ctx.save_for_backward(sample, conc)
        ctx.alpha, ctx.scale, ctx.beta_dtype = alpha, scale, beta.dtype
        return sample.to(y.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        sample, conc = ctx.saved_tensors
        # Every small op costs ~10–30 µs inside a CPU training step, so this is written
        # with as few of them as the maths allows.
        # a copy even when grad_out is already float64: autograd may hand the same tensor to
        # other branches, so it must not be modified in place
        g = grad_out.to(sample.dtype, copy=True)
        g -= torch.linalg.vecdot(sample, g).unsqueeze(-1)  # project onto the simplex's tangent
        dconc = torch._dirichlet_grad(sample, conc, conc.sum(-1, True).expand_as(conc))
        dconc *= g  # floored entries: straight-through (the gradient at the floor)
        grad_y = (dconc * (ctx.scale * (1.0 - ctx.alpha))).to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_beta = None
        if ctx.needs_input_grad[1]:
            grad_beta = dconc.sum(0, dtype=ctx.beta_dtype).mul_(ctx.scale * ctx.alpha)
        return grad_y, grad_beta, None, None


def dirichlet_targets(y: Tensor, beta: Tensor, alpha: float, scale: float = 1.0) -> Tensor:
    """Reparameterised sample ỹ ~ Dirichlet(scale·((1−α)·y + α·β)); gradients reach ``beta``.

    ``y``: N×K soft labels on the simplex; ``beta``: K positive. Uses torch's implicit
    reparameterisation gradients (Figurnov et al. 2018), as the paper does. Concentrations
    are floored at ``MIN_CONCENTRATION`` with a straight-through gradient; keep β ≥
    ``beta_lower_bound(...)`` (the SPROUT method does) and the floor never binds.
    """
    if y.ndim != 2:
        raise ValueError(f"y must be N×K soft labels, got shape {tuple(y.shape)}")
    return _DirichletTargets.apply(y, beta, alpha, scale)


def uniform_smooth(y: Tensor, alpha: float) -> Tensor:
    """Uniform label smoothing (Szegedy et al. 2016, paper eq. 5): (1−α)·y + α/K."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"label_smoothing.alpha must be in [0, 1], got {alpha}")
    return (1.0 - alpha) * y + alpha / y.shape[-1]


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of −Σ_k t_k log softmax(logits)_k (paper eq. 4).

    Computed by ``F.cross_entropy`` with class-probability targets (the same sum in one fused
    op, cheaper per step than the unfused expression), in float32 whatever the autocast.
    """
    if logits.ndim != 2 or targets.shape != logits.shape:
        raise ValueError(f"soft_cross_entropy needs N×K logits and targets, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    logits = logits.float()
    return F.cross_entropy(logits, targets.to(logits.dtype))


def beta_entropy(beta: Tensor) -> float:
    """Entropy (nats) of β normalised to the simplex; log K means uniform."""
    p = beta.detach().double().clamp_min(1e-12)
    p = p / p.sum()
    return float(-(p * p.log()).sum())
