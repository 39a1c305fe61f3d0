"""The training PGD (trainables/attacks/pgd.py): iterates stay in the ε-ball and [0, 1] for
every variant, the attack does its job, and BatchNorm mode is stated and restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables import ATTACKS, DATASETS, MODELS
from trainables.attacks.pgd import bn_mode, cw_margin_loss, pgd_linf
from trainables.loop import OptimConfig, fit
from trainables.methods import build_method


@pytest.fixture(scope="module")
def batch():
    x, y = DATASETS["digits"](split="test").tensors()
    return x[:48].clone(), y[:48].clone()  # many pixels sit at exactly 0 or 1: clipping matters


@pytest.fixture
def model():
    torch.manual_seed(0)
    return MODELS["small_cnn"](num_classes=10, in_channels=1, mean=(0.305,), std=(0.375,), width=8).eval()


@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_stays_in_the_eps_ball_and_the_unit_box(batch, model, restarts, loss, targeted, random_start):
    x, y = batch
    eps = 0.1
    target = (y + 1) % 10
    x_adv = pgd_linf(model, x, target if targeted else y, eps=eps, step_size=0.04, steps=5, restarts=restarts,
                     loss=loss, targeted=targeted, random_start=random_start, keep="last")
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert (x_adv - x).abs().max() > eps / 2  # it moved


@pytest.fixture(scope="module")
def trained():
    """A natural digits CNN (about a second of training): attacks on it have a clear effect."""
    torch.manual_seed(0)
    net = MODELS["small_cnn"](num_classes=10, in_channels=1, mean=(0.305,), std=(0.375,), width=8)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    fit(net, build_method("natural", {}, num_classes=10, lr=0.05), DATASETS["digits"](split="train"), None,
        epochs=2, batch_size=64, optim=OptimConfig(lr=0.05))
    torch.set_num_threads(before)
    return net.eval()


def test_untargeted_pgd_increases_the_loss_and_targeted_decreases_the_target_loss(batch, trained):
    x, y = batch
    model = trained
    clean_acc = (model(x).argmax(1) == y).float().mean()
    assert clean_acc > 0.8
    clean = F.cross_entropy(model(x), y)
    adv = pgd_linf(model, x, y, eps=0.1, step_size=0.025, steps=10)
    assert F.cross_entropy(model(adv), y) > clean + 0.5
    assert (model(adv).argmax(1) == y).float().mean() < clean_acc - 0.2
    target = (y + 3) % 10
    tadv = pgd_linf(model, x, target, eps=0.1, step_size=0.025, steps=10, targeted=True)
    assert F.cross_entropy(model(tadv), target) < F.cross_entropy(model(x), target) - 0.5
    cw = pgd_linf(model, x, y, eps=0.1, step_size=0.025, steps=10, loss="cw")
    assert cw_margin_loss(model(cw), y).mean() > cw_margin_loss(model(x), y).mean()


def test_restarts_keep_the_per_example_worst_case(batch, model):
    x, y = batch
    kw = dict(eps=0.1, step_size=0.025, steps=3)
    one = pgd_linf(model, x, y, generator=torch.Generator().manual_seed(0), **kw)
    many = pgd_linf(model, x, y, restarts=4, generator=torch.Generator().manual_seed(0), **kw)
    with torch.no_grad():
        l1 = F.cross_entropy(model(one), y, reduction="none")
        lm = F.cross_entropy(model(many), y, reduction="none")
        wrong1 = model(one).argmax(1) != y
        wrongm = model(many).argmax(1) != y
    # the first restart is the single run (same generator); the best of four is never worse
    assert (wrongm | ~wrong1).all()
    assert (lm[wrongm == wrong1] >= l1[wrongm == wrong1] - 1e-5).all()


def test_generator_makes_the_random_start_reproducible(batch, model):
    x, y = batch
    kw = dict(eps=0.1, step_size=0.025, steps=2)
    a = pgd_linf(model, x, y, generator=torch.Generator().manual_seed(5), **kw)
    b = pgd_linf(model, x, y, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b)


def test_pgd_leaves_no_parameter_gradients_and_eps_zero_is_identity(batch, model):
    x, y = batch
    pgd_linf(model, x, y, eps=0.1, step_size=0.025, steps=2)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(pgd_linf(model, x, y, eps=0.0, step_size=0.1, steps=5), x)


@pytest.mark.parametrize("kwargs", [dict(eps=-1.0), dict(step_size=-0.1), dict(steps=-1), dict(restarts=0)])
def test_pgd_rejects_bad_arguments(batch, model, kwargs):
    x, y = batch
    args = dict(eps=0.1, step_size=0.01, steps=1) | kwargs
    with pytest.raises(ValueError, match="PGD needs"):
        pgd_linf(model, x, y, **args)
    with pytest.raises(ValueError, match="loss"):
        pgd_linf(model, x, y, eps=0.1, step_size=0.01, steps=1, loss="hinge")


def bn_modes_seen(model: nn.Module) -> list[bool]:
    seen: list[bool] = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, inp: seen.append(mod.training))
            break
    return seen


@pytest.mark.parametrize("caller", ["train", "eval"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_pgd_runs_in_the_stated_bn_mode_and_restores_the_callers(batch, model, caller, mode):
    x, y = batch
    model.train(caller == "train")
    seen = bn_modes_seen(model)
    pgd_linf(model, x, y, eps=0.1, step_size=0.025, steps=3, restarts=2, bn=mode)
    assert seen and all(t == (mode == "train") for t in seen)
    assert model.training == (caller == "train")
    assert all(m.training == (caller == "train") for m in model.modules())


def test_bn_mode_restores_on_error_and_rejects_unknown_modes(model):
    model.train()
    with pytest.raises(RuntimeError, match="boom"), bn_mode(model, "eval"):
        assert not model.training
        raise RuntimeError("boom")
    assert model.training
    with pytest.raises(ValueError, match="bn_mode"), bn_mode(model, "x"):
        pass


def test_eval_mode_attack_leaves_running_statistics_alone(batch, model):
    x, y = batch
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    pgd_linf(model, x, y, eps=0.1, step_size=0.025, steps=3, bn="eval")
    assert torch.equal(bn.running_mean, before)


def test_registered_training_attacks_stay_in_the_ball(batch, model):
    x, y = batch
    for name, kw in [("pgd", dict(eps=0.05, steps=3)), ("fgsm_rs", dict(eps=0.05))]:
        x_adv = ATTACKS[name](**kw)(model, x, y)
        assert (x_adv - x).abs().max() <= 0.05 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("restarts", [1, 3])
def test_first_fooled_iterate_never_reports_higher_accuracy_than_the_last_iterate(batch, trained, restarts):
    """Same seed, same trajectory: keeping each example's first misclassified iterate can only
    lower the robust accuracy (a later step may climb the loss yet return to the right class)."""
    x, y = batch

    def acc(keep: str) -> Tensor:
        x_adv = pgd_linf(trained, x, y, eps=0.1, step_size=0.05, steps=10, restarts=restarts, keep=keep,
                         generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            return trained(x_adv).argmax(1) == y

    first, last = acc("first_fooled"), acc("last")
    assert (first <= last).all()  # per example, not just on average
    if restarts == 1:  # on this model and seed the last iterate really does return to the right class
        assert (first < last).any()
    with pytest.raises(ValueError, match="keep"):
        pgd_linf(trained, x, y, eps=0.1, step_size=0.05, steps=1, keep="best")


def test_targeted_restarts_choose_by_the_true_label(batch, trained):
    """A restart that fools the true label wins even when no restart reaches the target."""
    x, y = batch
    targets = (y + 3) % 10

    def acc(true_labels) -> Tensor:
        x_adv = pgd_linf(trained, x, targets, eps=0.08, step_size=0.02, steps=5, restarts=3, targeted=True,
                         true_labels=true_labels, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            return trained(x_adv).argmax(1) == y

    by_true, by_target = acc(y), acc(None)
    assert (by_true <= by_target).all() and (by_true < by_target).any()
