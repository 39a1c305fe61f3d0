"""The SPROUT method: β ascends the same loss that θ descends (one backward), stays ≥ β_min,
and the Table 7 switches turn its three parts on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainables.methods import build_method
from trainables.sprout import soft_cross_entropy


def fixed_noise_loss(method, model, x, y, seed: int) -> float:
    torch.manual_seed(seed)  # the same Gaussian noise, λ, permutation and Dirichlet draw
    with torch.no_grad():
        return float(method.loss(model, x, y).loss)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beta_moves_uphill_and_by_exactly_one_ascent_step(seed, digits_train, make_cnn):
    x, y = digits_train
    x, y = x[:128], y[:128]
    model = make_cnn(seed).train()
    lr = 1.0
    method = build_method("sprout", {"beta_lr": lr}, num_classes=10, lr=0.1, seed=seed)
    torch.manual_seed(100 + seed)
    out = method.loss(model, x, y)
    out.loss.backward()
    # one backward gives both gradients: θ's and β's
    assert all(p.grad is not None for p in model.parameters())
    grad = method.beta.grad.detach().clone()
    assert grad.abs().sum() > 0
    before = method.beta.detach().clone()
    loss_before = fixed_noise_loss(method, model, x, y, 100 + seed)
    assert loss_before == pytest.approx(float(out.loss.detach()), abs=0)  # the replay is exact
    method.after_step()
    assert method.beta.grad is None  # consumed
    # gradient *ascent*: β ← max(β + γ_β·∇_β L, β_min)
    assert torch.allclose(method.beta.detach(), (before + lr * grad).clamp_min(method.beta_floor), atol=1e-7)
    loss_after = fixed_noise_loss(method, model, x, y, 100 + seed)
    assert loss_after >= loss_before, (loss_before, loss_after)
    assert not torch.equal(method.beta.detach(), before)


def test_beta_stays_above_beta_min_under_a_huge_step(digits_batch, cnn):
    x, y = digits_batch
    beta_min = 0.05
    method = build_method("sprout", {"beta_lr": 1e4, "beta_min": beta_min}, num_classes=10, lr=0.1)
    for seed in range(3):
        torch.manual_seed(seed)
        method.loss(cnn.train(), x, y).loss.backward()
        method.after_step()
        cnn.zero_grad(set_to_none=True)
        assert (method.beta >= beta_min).all() and torch.isfinite(method.beta).all()
    # some component was pushed below the floor and projected back onto it (not vacuous)
    assert (method.beta == beta_min).any()


def test_beta_update_is_bitwise_the_sgd_ascent_step(digits_batch, cnn):
    """after_step is exactly torch.optim.SGD(maximize=True).step() followed by the floor."""
    x, y = digits_batch
    method = build_method("sprout", {"beta_lr": 0.37}, num_classes=10, lr=0.1, seed=5)
    torch.manual_seed(0)
    method.loss(cnn.train(), x, y).loss.backward()
    twin = method.beta.detach().clone().requires_grad_(True)
    twin.grad = method.beta.grad.clone()
    sgd = torch.optim.SGD([twin], lr=0.37, maximize=True)
    sgd.step()
    with torch.no_grad():
        twin.clamp_(min=method.beta_floor)
    method.after_step()
    assert torch.equal(method.beta.detach(), twin.detach())


def test_the_beta_optimizer_is_stepped_through_its_own_step(digits_batch, cnn):
    """β's update goes through beta_optimizer.step(): its hooks fire and its settings apply."""
    x, y = digits_batch
    method = build_method("sprout", {"beta_lr": 0.5}, num_classes=10, lr=0.1, seed=5)
    method.beta_optimizer = torch.optim.SGD([method.beta], lr=0.5, momentum=0.9, maximize=True)
    calls = []
    method.beta_optimizer.register_step_post_hook(lambda *_: calls.append(1))
    for seed in range(2):
        torch.manual_seed(seed)
        method.loss(cnn.train(), x, y).loss.backward()
        method.after_step()
    assert method.beta_optimizer.state[method.beta]["momentum_buffer"] is not None
    assert len(calls) == 2


def test_beta_init_random_is_seeded_positive_and_ones_is_ones():
    a = build_method("sprout", {}, num_classes=10, lr=0.1, seed=3).beta.detach()
    b = build_method("sprout", {}, num_classes=10, lr=0.1, seed=3).beta.detach()
    c = build_method("sprout", {}, num_classes=10, lr=0.1, seed=4).beta.detach()
    assert torch.equal(a, b) and not torch.equal(a, c) and (a > 0).all()
    ones = build_method("sprout", {"beta_init": "ones"}, num_classes=10, lr=0.1).beta.detach()
    assert torch.equal(ones, torch.ones(10))


def test_beta_lr_defaults_to_the_model_lr():
    assert build_method("sprout", {}, num_classes=10, lr=0.37).beta_optimizer.param_groups[0]["lr"] == 0.37
    assert build_method("sprout", {"beta_lr": 0.5}, num_classes=10, lr=0.37).beta_optimizer.param_groups[0]["lr"] == 0.5
    assert build_method("sprout", {}, num_classes=10, lr=0.37).beta_optimizer.param_groups[0]["maximize"] is True


def test_all_parts_off_is_plain_cross_entropy(digits_batch, cnn):
    x, y = digits_batch
    off = {"use_gaussian": False, "use_mixup": False, "use_dirichlet": False}
    method = build_method("sprout", off, num_classes=10, lr=0.1)
    cnn.eval()
    out = method.loss(cnn, x, y)
    assert torch.allclose(out.loss, F.cross_entropy(cnn(x), y), atol=1e-6)
    out.loss.backward()
    assert method.beta.grad is None  # Dirichlet off: β is not used and not updated
    before = method.beta.detach().clone()
    method.after_step()
    assert torch.equal(method.beta.detach(), before)


def test_gaussian_only_adds_delta_times_standard_normal(digits_batch, cnn):
    x, y = digits_batch
    method = build_method(
        "sprout", {"use_mixup": False, "use_dirichlet": False, "gaussian_delta": 0.2}, num_classes=10, lr=0.1
    )
    cnn.eval()
    torch.manual_seed(7)
    got = method.loss(cnn, x, y).loss
    torch.manual_seed(7)
    want = F.cross_entropy(cnn(x + 0.2 * torch.randn(x.shape)), y)
    assert torch.allclose(got, want, atol=1e-6)


def test_mixup_only_mixes_inputs_and_labels(digits_batch, cnn, monkeypatch):
    x, y = digits_batch
    import trainables.methods.sprout as sprout_method

    perm = torch.roll(torch.arange(len(x)), 1)
    real_mixup = sprout_method.mixup
    monkeypatch.setattr(sprout_method, "mixup", lambda xx, yy, a: real_mixup(xx, yy, a, lam=0.25, perm=perm))
    method = build_method("sprout", {"use_gaussian": False, "use_dirichlet": False}, num_classes=10, lr=0.1)
    cnn.eval()
    out = method.loss(cnn, x, y)
    y1 = F.one_hot(y, 10).float()
    want = soft_cross_entropy(cnn(0.25 * x + 0.75 * x[perm]), 0.25 * y1 + 0.75 * y1[perm])
    assert torch.allclose(out.loss, want, atol=1e-6)
    assert torch.equal(out.labels, y[perm])  # scored against the dominant mixed label


@pytest.mark.parametrize("ga", [False, True])
@pytest.mark.parametrize("mix", [False, True])
@pytest.mark.parametrize("dirichlet", [False, True])
def test_every_table7_combination_trains_a_step(ga, mix, dirichlet, digits_batch, cnn):
    x, y = digits_batch
    method = build_method(
        "sprout", {"use_gaussian": ga, "use_mixup": mix, "use_dirichlet": dirichlet}, num_classes=10, lr=0.1
    )
    out = method.loss(cnn.train(), x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert (method.beta.grad is not None) == dirichlet


def test_state_dict_round_trip_restores_beta(digits_batch, cnn):
    x, y = digits_batch
    m = build_method("sprout", {}, num_classes=10, lr=0.1, seed=1)
    m.loss(cnn.train(), x, y).loss.backward()
    m.after_step()
    m2 = build_method("sprout", {}, num_classes=10, lr=0.1, seed=2)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.beta.detach(), m.beta.detach())
    assert "sprout/beta_entropy" in m2.epoch_metrics()
