"""Every registered method trains; the adversarial baselines do what their papers say;
method parameters are validated with errors naming ``<method>.<key>``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

from trainables import DATASETS, METHODS
from trainables.loop import OptimConfig, build_optimizer, fit, train_epoch, train_step
from trainables.methods import Method, build_method

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_decreases_its_loss_on_digits(name, digits_train, make_cnn):
    """Parametrised over the registry, so a newly registered method is covered automatically."""
    x, y = digits_train
    model = make_cnn().train()
    method = build_method(name, {}, num_classes=10, lr=0.05, seed=0)
    assert isinstance(method, Method) and method.name == name
    opt = build_optimizer(model, OptimConfig(lr=0.05))
    xe, ye = x[:128], y[:128]

    def loss_on_fixed_batch() -> float:
        torch.manual_seed(123)  # the same noise / random start / λ before and after
        return float(method.loss(model, xe, ye).loss.detach())

    before = loss_on_fixed_batch()
    for i in range(30):
        j = (i * 64) % (len(x) - 64)
        for _ in range(method.replays):
            out = train_step(model, method, opt, x[j : j + 64], y[j : j + 64])
            assert torch.isfinite(out.loss)
    after = loss_on_fixed_batch()
    assert math.isfinite(before) and after < 0.8 * before, (name, before, after)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_with_defaults_and_returns_scoreable_output(name, digits_batch, cnn):
    x, y = digits_batch
    method = build_method(name, None, num_classes=10, lr=0.1)
    out = method.loss(cnn.train(), x, y)
    assert out.loss.ndim == 0 and out.loss.requires_grad
    assert out.logits.shape == (len(x), 10) and out.labels.shape == (len(x),)
    assert method.replays >= 1 and method.epoch_divisor >= 1


def test_trades_with_beta_zero_is_exactly_clean_cross_entropy(digits_batch, cnn):
    x, y = digits_batch
    method = build_method("trades", {"beta": 0.0}, num_classes=10, lr=0.1)
    cnn.train()
    got = method.loss(cnn, x, y).loss
    want = F.cross_entropy(cnn(x), y)
    assert torch.equal(got, want)


def test_trades_adds_a_nonnegative_kl_term(digits_batch, cnn):
    x, y = digits_batch
    cnn.train()
    torch.manual_seed(0)
    out = build_method("trades", {}, num_classes=10, lr=0.1).loss(cnn, x, y)
    kl = out.metrics["train/trades_kl"]
    assert kl > 0
    assert float(out.loss.detach()) == pytest.approx(float(F.cross_entropy(cnn(x), y).detach()) + 6.0 * kl, rel=1e-5)


class StepCounter:
    """Counts optimizer.step() calls of every optimizer (a global post-step hook)."""

    def __init__(self) -> None:
        self.steps = 0

    def __enter__(self) -> StepCounter:
        self.handle = register_optimizer_step_post_hook(self)
        return self

    def __call__(self, optimizer, args, kwargs) -> None:
        self.steps += 1

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def test_free_at_replays_each_batch_m_times_and_divides_the_epochs(digits_train, make_cnn):
    ds = DATASETS["digits"](split="train", seed=0)
    sub = torch.utils.data.Subset(ds, range(200))
    method = build_method("free_at", {"replays": 3, "eps": 0.1}, num_classes=10, lr=0.05)
    assert method.replays == 3 and method.epoch_divisor == 3
    batches_per_epoch = math.ceil(200 / 64)
    with StepCounter() as count:
        history = fit(make_cnn(), method, sub, None, epochs=6, batch_size=64, optim=OptimConfig(lr=0.05), seed=0)
    assert len(history) == 2  # 6 epochs / m = 3
    assert count.steps == 2 * batches_per_epoch * 3
    # δ is carried across replays and batches, and stays in the ε-ball
    assert method.delta is not None and method.delta.abs().max() <= 0.1 + 1e-7 and method.delta.abs().sum() > 0


def test_free_at_updates_delta_by_eps_sign_of_its_gradient(digits_batch, cnn):
    x, y = digits_batch
    eps = 0.05
    method = build_method("free_at", {"replays": 2, "eps": eps}, num_classes=10, lr=0.05)
    opt = build_optimizer(cnn, OptimConfig(lr=0.05))
    with StepCounter() as count:
        stats = train_epoch(cnn, method, opt, [(x, y)], CPU, epoch=0, seed=0)
    assert count.steps == 2 and stats.steps == 1
    # δ ← clip(δ + ε·sign(∇_δ L), −ε, ε) from the same backward as θ
    m1 = build_method("free_at", {"replays": 1, "eps": eps}, num_classes=10, lr=0.05)
    out = m1.loss(cnn, x, y)
    out.loss.backward()
    live = m1._live
    m1.after_step()
    assert torch.equal(m1.delta, (live.detach() + eps * live.grad.sign()).clamp(-eps, eps))
    assert torch.isin(m1.delta, torch.tensor([-eps, 0.0, eps])).all()  # from δ = 0, every entry moves by ±ε


def test_free_at_delta_survives_a_state_dict_round_trip(digits_batch, cnn):
    x, y = digits_batch
    m = build_method("free_at", {"eps": 0.05}, num_classes=10, lr=0.05)
    m.loss(cnn, x, y).loss.backward()
    m.after_step()
    m2 = build_method("free_at", {"eps": 0.05}, num_classes=10, lr=0.05)
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.delta, m.delta)


@pytest.mark.parametrize("name", ["pgd_at", "fgsm_rs"])
def test_adversarial_training_inputs_stay_in_the_eps_ball(name, digits_batch, cnn, monkeypatch):
    x, y = digits_batch
    eps = 0.1
    seen = []
    method = build_method(name, {"eps": eps}, num_classes=10, lr=0.05)
    cnn.train()
    handle = cnn.register_forward_pre_hook(lambda mod, inp: seen.append((inp[0].detach().clone(), mod.training)))
    try:
        method.loss(cnn, x, y)
    finally:
        handle.remove()
    *attack_calls, (final_x, final_training) = seen
    assert final_training, "the loss forward must run in train mode"
    assert (final_x - x).abs().max() <= eps + 1e-6 and final_x.min() >= 0 and final_x.max() <= 1
    assert not torch.equal(final_x, x)  # trains on x_adv only
    mode = method.params.bn_mode
    assert attack_calls and all(t == (mode == "train") for _, t in attack_calls)
    assert cnn.training  # the caller's mode is restored


def test_pgd_at_increases_the_loss_over_clean(digits_batch, cnn):
    x, y = digits_batch
    cnn.eval()
    method = build_method("pgd_at", {"eps": 0.1, "step_size": 0.025}, num_classes=10, lr=0.05)
    torch.manual_seed(0)
    adv = float(method.loss(cnn, x, y).loss.detach())
    assert adv > float(F.cross_entropy(cnn(x), y).detach())


@pytest.mark.parametrize(
    "name,params,field",
    [
        ("sprout", {"dirichlet_alpha": 2}, "sprout.dirichlet_alpha"),
        ("sprout", {"dirichlet_scale": 0}, "sprout.dirichlet_scale"),
        ("sprout", {"mixup_alpha": -1}, "sprout.mixup_alpha"),
        ("sprout", {"gaussian_delta": -0.1}, "sprout.gaussian_delta"),
        ("sprout", {"beta_init": "zeros"}, "sprout.beta_init"),
        ("sprout", {"beta_min": 0}, "sprout.beta_min"),
        ("sprout", {"beta_lr": -1.0}, "sprout.beta_lr"),
        ("sprout", {"no_such_key": 1}, "sprout.no_such_key"),
        ("sprout", {"dirichlet_alpha": "0.01"}, "sprout.dirichlet_alpha"),
        ("sprout", {"use_mixup": "yes"}, "sprout.use_mixup"),
        ("pgd_at", {"steps": 0}, "pgd_at.steps"),
        ("pgd_at", {"steps": 2.5}, "pgd_at.steps"),
        ("pgd_at", {"bn_mode": "x"}, "pgd_at.bn_mode"),
        ("pgd_at", {"eps": -0.1}, "pgd_at.eps"),
        ("pgd_at", {"eps": float("nan")}, "pgd_at.eps"),
        ("trades", {"beta": -1}, "trades.beta"),
        ("trades", {"bn_mode": "test"}, "trades.bn_mode"),
        ("free_at", {"replays": 0}, "free_at.replays"),
        ("fgsm_rs", {"step_size": -1}, "fgsm_rs.step_size"),
        ("label_smoothing", {"alpha": 1.5}, "label_smoothing.alpha"),
        ("natural", {"lr": 0.1}, "natural.lr"),
    ],
)
def test_bad_method_parameters_raise_errors_naming_the_key(name, params, field):
    with pytest.raises(ValueError) as e:
        build_method(name, params, num_classes=10, lr=0.1)
    assert field in str(e.value)


def test_unknown_key_error_lists_the_allowed_keys():
    with pytest.raises(ValueError, match="dirichlet_alpha") as e:
        build_method("sprout", {"alpah": 0.1}, num_classes=10, lr=0.1)
    assert "sprout.alpah" in str(e.value)


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(KeyError, match="natural"):
        build_method("nope", {}, num_classes=10, lr=0.1)


def test_integer_values_are_accepted_for_float_parameters():
    m = build_method("sprout", {"dirichlet_scale": 11, "beta_lr": 1}, num_classes=10, lr=0.1)
    assert m.params.dirichlet_scale == 11 and m.beta_optimizer.param_groups[0]["lr"] == 1
    assert isinstance(m.params.dirichlet_scale, float)


def test_numpy_scalars_from_a_sampler_are_accepted_as_python_numbers():
    import numpy as np

    m = build_method("free_at", {"replays": np.int64(4), "eps": np.float32(0.5)}, num_classes=10, lr=0.1)
    assert m.replays == 4 and type(m.params.replays) is int
    assert type(m.params.eps) is float and m.params.eps == 0.5
    s = build_method("sprout", {"use_mixup": np.bool_(False)}, num_classes=10, lr=0.1)
    assert s.params.use_mixup is False
