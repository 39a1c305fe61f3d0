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


class _DirichletTargets(torch.autograd.Function):
    """c = clamp(s·((1−α)·y + α·β), MIN_CONCENTRATION) → ỹ = Dirichlet(c).rsample(), fused.

    The same kernels, random stream and gradient formula as
    ``torch.distributions.Dirichlet(c.double()).rsample()`` behind the autograd chain
    (concentration → clamp → float64 → sample → cast), bit for bit; as one autograd node it
    saves the distribution object, its argument validation and five small autograd nodes per
    step (about 0.1 ms on a CPU, see BENCHMARKS.md).
    """

    @staticmethod
    def forward(ctx, y: Tensor, beta: Tensor, alpha: float, scale: float) -> Tensor:  # type: ignore[override]
        pre = dirichlet_concentration(y, beta, alpha, scale)
        # Sampled in float64: tiny concentrations (α·β ≈ 0.01) underflow in float32, and
        # torch's Dirichlet gradient kernel is also faster in float64 on CPU.
        conc = pre.clamp_min(MIN_CONCENTRATION).double()
        sample = torch._sample_dirichlet(conc)
        ctx.save_for_backward(sample, conc, pre)
        ctx.alpha, ctx.scale, ctx.beta_dtype = alpha, scale, beta.dtype
        return sample.to(y.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        sample, conc, pre = ctx.saved_tensors
        g = grad_out.to(sample.dtype)
        # torch.distributions.dirichlet._Dirichlet_backward: implicit reparameterisation
        total = conc.sum(-1, True).expand_as(conc)
        dconc = torch._dirichlet_grad(sample, conc, total) * (g - (sample * g).sum(-1, True))
        # back through the cast, clamp_min (zero gradient where clamped) and s·(...), in
        # autograd's order, so gradients match the unfused chain exactly
        dpre = torch.where(pre >= MIN_CONCENTRATION, dconc.to(pre.dtype), 0.0) * ctx.scale
        grad_y = dpre * (1.0 - ctx.alpha) if ctx.needs_input_grad[0] else None
        grad_beta = (dpre.sum(0) * ctx.alpha).to(ctx.beta_dtype) if ctx.needs_input_grad[1] else None
        return grad_y, grad_beta, None, None


def dirichlet_targets(y: Tensor, beta: Tensor, alpha: float, scale: float = 1.0) -> Tensor:
    """Reparameterised sample ỹ ~ Dirichlet(scale·((1−α)·y + α·β)); gradients reach ``beta``.

    ``y``: N×K soft labels on the simplex; ``beta``: K positive. Uses torch's implicit
    reparameterisation gradients (Figurnov et al. 2018), as the paper does. Concentrations
    are floored at ``MIN_CONCENTRATION`` (no gradient flows through a floored entry).
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
