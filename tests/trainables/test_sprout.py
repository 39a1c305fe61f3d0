"""SPROUT's pieces (trainables/sprout.py): Dirichlet targets, Gaussian augmentation, mixup,
the Beta sampler and the losses. Statistical checks use seeded draws and tolerances of
several Monte-Carlo standard errors, so they are deterministic and not vacuous."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import trainables
from trainables.sprout import (
    MIN_CONCENTRATION,
    beta_entropy,
    dirichlet_concentration,
    dirichlet_targets,
    floored_concentration,
    gaussian_augment,
    mixup,
    sample_beta,
    soft_cross_entropy,
    uniform_smooth,
)

K = 4
BETA = [0.5, 1.0, 1.5, 2.0]
Y_SOFT = [0.6, 0.4, 0.0, 0.0]
# (alpha, scale): the SPEC default (tiny off-class concentrations α·β ≈ 0.01), the authors'
# released-code preset (s = 11, α = 1/11) and a moderate one.
CONFIGS = [(0.01, 1.0), (1 / 11, 11.0), (0.5, 4.0)]


def rows(y: list[float], n: int) -> torch.Tensor:
    return torch.tensor(y).expand(n, len(y)).contiguous()


def expected(y: list[float], beta: list[float], alpha: float, scale: float) -> torch.Tensor:
    c = scale * ((1 - alpha) * torch.tensor(y, dtype=torch.float64) + alpha * torch.tensor(beta, dtype=torch.float64))
    return c / c.sum()


def test_top_level_export_is_the_same_function():
    assert trainables.dirichlet_targets is dirichlet_targets


@pytest.mark.parametrize("alpha,scale", CONFIGS)
@pytest.mark.parametrize("y", [Y_SOFT, [1.0, 0.0, 0.0, 0.0]])
def test_dirichlet_samples_lie_on_the_simplex(alpha, scale, y):
    torch.manual_seed(0)
    s = dirichlet_targets(rows(y, 2000), torch.tensor(BETA), alpha, scale)
    assert s.shape == (2000, K) and s.dtype == torch.float32
    assert torch.isfinite(s).all()
    assert (s >= 0).all() and (s <= 1).all()
    assert torch.allclose(s.double().sum(1), torch.ones(2000, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("alpha,scale", CONFIGS)
def test_dirichlet_sample_mean_matches_normalised_concentration(alpha, scale):
    n = 40_000
    torch.manual_seed(1)
    s = dirichlet_targets(rows(Y_SOFT, n), torch.tensor(BETA), alpha, scale).double()
    m = expected(Y_SOFT, BETA, alpha, scale)
    total = scale * ((1 - alpha) * sum(Y_SOFT) + alpha * sum(BETA))
    se = (m * (1 - m) / (total + 1) / n).sqrt()  # Dirichlet marginal variance m(1−m)/(c0+1)
    assert ((s.mean(0) - m).abs() <= 5 * se + 1e-9).all(), (s.mean(0), m, se)
    # and the empirical variance is the Dirichlet one (within 10 %)
    assert torch.allclose(s.var(0), m * (1 - m) / (total + 1), rtol=0.1)


def test_large_scale_concentrates_samples_on_the_mean():
    m = expected(Y_SOFT, BETA, 0.3, 1.0)  # the mean does not depend on the scale
    spread = []
    for scale in (1.0, 10.0, 100.0, 10_000.0):
        torch.manual_seed(2)
        s = dirichlet_targets(rows(Y_SOFT, 5000), torch.tensor(BETA), 0.3, scale).double()
        spread.append(float((s - m).pow(2).sum(1).mean()))
    assert spread == sorted(spread, reverse=True) and spread[-1] < spread[0] / 1000
    torch.manual_seed(3)
    s = dirichlet_targets(rows(Y_SOFT, 5000), torch.tensor(BETA), 0.3, 1e6).double()
    assert (s - m).abs().max() < 0.01


def analytic_grad(y, beta, alpha, scale, logp):
    """∂/∂β of the expected soft CE −Σ_k E[ỹ_k] log p_k with E[ỹ_k] = c_k / Σc.

    ∂E[ỹ_k]/∂β_j = s·α·(δ_jk·C − c_k)/C², so the gradient is −(s·α/C)·(log p_j − Σ_k m_k log p_k).
    """
    c = scale * ((1 - alpha) * torch.tensor(y, dtype=torch.float64) + alpha * torch.tensor(beta, dtype=torch.float64))
    total = c.sum()
    m = c / total
    return -(scale * alpha / total) * (logp - (m * logp).sum())


@pytest.mark.parametrize("y", [Y_SOFT, [1.0, 0.0, 0.0, 0.0]])
@pytest.mark.parametrize("alpha,scale", CONFIGS)
def test_beta_gradient_matches_the_analytic_gradient_of_the_expected_loss(alpha, scale, y):
    logits = torch.tensor([1.0, -0.5, 0.3, -1.2])
    logp = F.log_softmax(logits.double(), 0)
    want = analytic_grad(y, BETA, alpha, scale, logp)
    # the closed form agrees with autograd through the expectation itself
    b = torch.tensor(BETA, dtype=torch.float64, requires_grad=True)
    c = dirichlet_concentration(torch.tensor([y], dtype=torch.float64), b, alpha, scale)[0]
    (-(c / c.sum() * logp).sum()).backward()
    assert torch.allclose(b.grad, want, atol=1e-12)
    # Monte Carlo over reparameterised samples: chunk means give a standard error
    torch.manual_seed(4)
    grads = []
    for _ in range(20):
        beta = torch.tensor(BETA, requires_grad=True)
        s = dirichlet_targets(rows(y, 20_000), beta, alpha, scale)
        (-(s * logp.float()).sum(1).mean()).backward()
        grads.append(beta.grad.double())
    g = torch.stack(grads)
    mean, se = g.mean(0), g.std(0) / math.sqrt(len(grads))
    assert (se < 0.05 * want.abs().max()).all(), "the Monte-Carlo estimate is too noisy to test anything"
    assert ((mean - want).abs() <= 5 * se + 1e-4 * want.abs().max()).all(), (mean, want, se)


def reference_dirichlet_targets(y, beta, alpha, scale):
    """The unfused definition: torch.distributions' Dirichlet on the floored concentration."""
    return torch.distributions.Dirichlet(floored_concentration(y, beta, alpha, scale)).rsample().to(y.dtype)


@pytest.mark.parametrize("alpha,scale", [*CONFIGS, (0.3, 0.7)])
def test_fused_sampler_equals_torch_distributions_dirichlet(alpha, scale):
    """Same samples bit for bit (same kernel, same random stream); gradients equal to autograd
    through the unfused chain up to float rounding (floored entries: ≈ 0 either way)."""
    g = torch.Generator().manual_seed(12)
    y1 = F.one_hot(torch.randint(10, (64,), generator=g), 10).float()
    y = (0.7 * y1 + 0.3 * y1[torch.randperm(64, generator=g)]).requires_grad_(True)
    beta = torch.rand(10, generator=g) + 0.1
    beta[3] = 0.005  # α·β below MIN_CONCENTRATION for small α: the floor's zero gradient too
    beta.requires_grad_(True)
    w = torch.randn(64, 10, generator=g)
    results = []
    for fn in (reference_dirichlet_targets, dirichlet_targets):
        torch.manual_seed(13)
        s = fn(y, beta, alpha, scale)
        (s * w).sum().backward()
        results.append((s.detach(), beta.grad.clone(), y.grad.clone()))
        beta.grad = y.grad = None
    (s_ref, gb_ref, gy_ref), (s_new, gb_new, gy_new) = results
    assert torch.equal(s_ref, s_new)
    assert torch.allclose(gb_new, gb_ref, rtol=1e-5, atol=1e-6 * gb_ref.abs().max())
    assert torch.allclose(gy_new, gy_ref, rtol=1e-5, atol=1e-6 * gy_ref.abs().max())
    if alpha == 0.01:  # β₃·α = 5e-5: the floor is exercised (rows without mass on class 3)
        assert (floored_concentration(y, beta, alpha, scale) == MIN_CONCENTRATION).any()


def test_gradients_reach_beta_and_y_only_through_the_sample():
    torch.manual_seed(5)
    beta = torch.tensor(BETA, requires_grad=True)
    y = rows(Y_SOFT, 8).requires_grad_(True)
    s = dirichlet_targets(y, beta, 0.2, 2.0)
    assert s.requires_grad
    (s * torch.randn(8, K)).sum().backward()
    assert beta.grad is not None and torch.isfinite(beta.grad).all() and beta.grad.abs().sum() > 0
    assert y.grad is not None and torch.isfinite(y.grad).all()


def test_tiny_beta_gives_finite_samples_and_gradients():
    """β at its floor (β_min = 1e-3) makes α·β ≈ 1e-5: samples and gradients stay finite."""
    torch.manual_seed(6)
    beta = torch.full((10,), 1e-3, requires_grad=True)
    y = F.one_hot(torch.arange(10).repeat(20), 10).float()
    s = dirichlet_targets(y, beta, 0.01, 1.0)
    assert torch.isfinite(s).all() and torch.allclose(s.sum(1), torch.ones(200), atol=1e-5)
    soft_cross_entropy(torch.randn(200, 10), s).backward()
    assert torch.isfinite(beta.grad).all()


def test_floored_concentrations_get_a_finite_straight_through_gradient():
    """Below the floor the public sampler passes the gradient at the floor (finite; the SPROUT
    method never lets β get there: see test_fairness's small-β test)."""
    torch.manual_seed(14)
    beta = torch.tensor([1.0] * 9 + [1e-3], requires_grad=True)  # α·β₉ = 1e-5 < MIN_CONCENTRATION
    y = F.one_hot(torch.arange(50) % 5, 10).float()  # no mass on class 9
    soft_cross_entropy(torch.randn(50, 10), dirichlet_targets(y, beta, 0.01, 1.0)).backward()
    # straight-through: the floored β₉ still gets a (finite, non-zero) gradient, not the old 0
    assert torch.isfinite(beta.grad).all() and (beta.grad != 0).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": 1.5}, "dirichlet_alpha"),
        ({"alpha": -0.1}, "dirichlet_alpha"),
        ({"scale": 0.0}, "dirichlet_scale"),
        ({"beta": torch.ones(3)}, "beta must have shape"),
        ({"y": torch.ones(4)}, "N×K"),
    ],
)
def test_dirichlet_targets_rejects_bad_arguments(kwargs, match):
    args = {"y": rows(Y_SOFT, 2), "beta": torch.tensor(BETA), "alpha": 0.01, "scale": 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        dirichlet_targets(**args)


def test_gaussian_augment_is_exact_given_the_noise():
    x = torch.rand(5, 3, 4, 4)
    noise = torch.randn(5, 3, 4, 4)
    out = gaussian_augment(x, 0.1, noise=noise)
    assert torch.equal(out, x + 0.1 * noise)
    assert out.min() < 0 or out.max() > 1  # no clipping by default (SPEC §2 step 1) ...
    assert torch.equal(gaussian_augment(x, 0.1, noise=noise, clip=True), (x + 0.1 * noise).clamp(0, 1))  # ... unless asked
    assert torch.equal(gaussian_augment(x, 0.0, noise=noise), x)


def test_gaussian_augment_noise_comes_from_the_generator():
    x = torch.rand(64, 1, 8, 8)
    a = gaussian_augment(x, 0.25, generator=torch.Generator().manual_seed(7))
    b = gaussian_augment(x, 0.25, generator=torch.Generator().manual_seed(7))
    c = gaussian_augment(x, 0.25, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = (a - x) / 0.25
    assert abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1
    with pytest.raises(ValueError, match="gaussian_delta"):
        gaussian_augment(x, -0.1)


def test_mixup_is_exact_given_lambda_and_permutation():
    x = torch.rand(6, 1, 8, 8)
    y = F.one_hot(torch.tensor([0, 1, 2, 3, 4, 5]), 7).float()
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    x_mix, y_mix, lam = mixup(x, y, 0.2, lam=0.3, perm=perm)
    assert lam == 0.3
    assert torch.equal(x_mix, 0.3 * x + 0.7 * x[perm])
    assert torch.equal(y_mix, 0.3 * y + 0.7 * y[perm])
    assert torch.allclose(y_mix.sum(1), torch.ones(6))
    # identity permutation: nothing is mixed
    x_id, y_id, _ = mixup(x, y, 0.2, lam=0.3, perm=torch.arange(6))
    assert torch.allclose(x_id, x) and torch.allclose(y_id, y)


def test_mixup_draws_from_the_generator():
    x, y = torch.rand(16, 3), F.one_hot(torch.arange(16) % 4, 4).float()
    a = mixup(x, y, 0.2, generator=torch.Generator().manual_seed(9))
    b = mixup(x, y, 0.2, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert 0.0 < a[2] < 1.0
    with pytest.raises(ValueError, match="mixup_alpha"):
        mixup(x, y, 0.0)


def test_sample_beta_is_reproducible_and_in_the_open_unit_interval():
    g1, g2 = torch.Generator().manual_seed(10), torch.Generator().manual_seed(10)
    a = [sample_beta(0.2, g1) for _ in range(200)]
    b = [sample_beta(0.2, g2) for _ in range(200)]
    assert a == b
    assert all(0.0 < v < 1.0 for v in a)
    assert len(set(a)) == len(a)


@pytest.mark.parametrize("a", [0.05, 0.2, 1.0, 2.0, 8.0])
def test_sample_beta_has_the_beta_distribution(a):
    g = torch.Generator().manual_seed(11)
    v = torch.tensor([sample_beta(a, g) for _ in range(4000)], dtype=torch.float64)
    var = 1 / (4 * (2 * a + 1))  # Var of Beta(a, a)
    assert abs(float(v.mean()) - 0.5) < 5 * math.sqrt(var / len(v))
    assert abs(float(v.var()) - var) < 0.1 * var
    if a >= 0.2:  # below, ~8 % of the mass lies within 1e-16 of 1 and rounds to 1.0 in float64
        from scipy import stats

        assert stats.kstest(v.numpy(), stats.beta(a, a).cdf).pvalue > 1e-3
    assert ((v >= 0) & (v <= 1)).all()


def test_sample_beta_rejects_a_nonpositive_parameter():
    with pytest.raises(ValueError, match="mixup_alpha"):
        sample_beta(0.0)


def test_uniform_smooth_and_soft_cross_entropy():
    y = F.one_hot(torch.tensor([2, 0]), 5).float()
    sm = uniform_smooth(y, 0.1)
    assert torch.allclose(sm, 0.9 * y + 0.02) and torch.allclose(sm.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="label_smoothing.alpha"):
        uniform_smooth(y, 1.5)
    logits = torch.randn(2, 5)
    assert torch.allclose(soft_cross_entropy(logits, y), F.cross_entropy(logits, torch.tensor([2, 0])))
    assert torch.allclose(soft_cross_entropy(logits, sm), F.cross_entropy(logits, torch.tensor([2, 0]), label_smoothing=0.1))


def test_beta_entropy():
    assert beta_entropy(torch.ones(10)) == pytest.approx(math.log(10))
    assert beta_entropy(torch.tensor([1.0, 1e-9, 1e-9])) < 1e-6
