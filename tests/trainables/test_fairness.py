"""Issue 13, training core: fair comparisons (augmentation, β's schedule, selection metric) and
SPROUT exactly as specified (floor vs projection, the reference-code switches, uniform LS)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from trainables import DATASETS, METHODS
from trainables.data.augment import build_augment, random_crop_flip
from trainables.loop import OptimConfig, augment_generator, fit, lr_at, make_loader, train_epoch
from trainables.methods import Method, StepOutput, build_method
from trainables.methods.adversarial import FreeAT, FreeATParams
from trainables.methods.sprout import SproutParams, sprout_loss
from trainables.sprout import MIN_CONCENTRATION, dirichlet_concentration, dirichlet_targets, soft_cross_entropy

CPU = torch.device("cpu")


# ------------------------------------------------------------------ augmentation


def test_random_crop_flip_is_the_padded_crop_then_the_flip():
    x = torch.rand(6, 3, 8, 8)
    offsets = torch.tensor([[0, 0], [8, 8], [4, 4], [1, 7], [3, 0], [8, 2]])
    flips = torch.tensor([False, True, False, True, True, False])
    out = random_crop_flip(x, offsets=offsets, flips=flips)
    padded = F.pad(x, (4, 4, 4, 4))
    for i, ((dy, dx), f) in enumerate(zip(offsets.tolist(), flips.tolist())):
        want = padded[i, :, dy:dy + 8, dx:dx + 8]
        assert torch.equal(out[i], want.flip(-1) if f else want), i
    assert torch.equal(out[2], x[2])  # centre crop, no flip: the image itself


def test_augmentation_is_exact_given_the_generator_and_differs_across_epochs():
    x = torch.rand(32, 3, 8, 8)
    a = random_crop_flip(x, torch.Generator().manual_seed(5))
    b = random_crop_flip(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    e0 = random_crop_flip(x, augment_generator(seed=3, epoch=0))
    e1 = random_crop_flip(x, augment_generator(seed=3, epoch=1))
    assert torch.equal(e0, random_crop_flip(x, augment_generator(seed=3, epoch=0)))
    assert not torch.equal(e0, e1)


class _Recorder(Method):
    """Records each training batch it is given (the augmented images) and returns a zero loss."""

    name = "recorder"
    Params = dataclasses.make_dataclass("RecorderParams", [])

    def __init__(self) -> None:
        self.seen: list[tuple[Tensor, Tensor]] = []

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        self.seen.append((x.detach().clone(), y.clone()))
        logits = model(x)
        return StepOutput(logits.sum() * 0.0, logits, y % 2)


def test_the_same_train_index_gets_other_crops_in_other_epochs_and_the_same_on_replay():
    n = 24
    images = torch.rand(n, 3, 8, 8) * 0.9 + 0.1  # no zero pixels: padding is visible
    index = torch.arange(n)  # the "label" is the example's index, to find it after shuffling
    ds = TensorDataset(images, index)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = make_loader(ds, 8, seed=1, shuffle=True)

    def epoch_views(epoch: int) -> dict[int, Tensor]:
        rec = _Recorder()
        train_epoch(model, rec, opt, loader, CPU, epoch=epoch, seed=1, augment=random_crop_flip)
        return {int(i): xi for x, idx in rec.seen for xi, i in zip(x, idx)}

    v0, v1, v0_again = epoch_views(0), epoch_views(1), epoch_views(0)
    assert sorted(v0) == list(range(n))
    assert all(torch.equal(v0[i], v0_again[i]) for i in range(n))  # replayable (resume is exact)
    assert sum(not torch.equal(v0[i], v1[i]) for i in range(n)) >= n // 2  # new crops/flips per epoch
    assert sum(not torch.equal(v0[i], images[i]) for i in range(n)) >= n // 2  # it did augment


def test_validation_and_test_images_are_never_augmented():
    """The worker's val loader yields the dataset's images untouched while training is augmented."""
    from orchestrator.config import load_config
    from orchestrator.worker import build_run, datasets

    cfg = load_config(None, ["data.name=synthetic", "data.image_size=8", "data.num_samples=64",
                             "data.augment=standard", "data.val_fraction=0.25", "method=natural",
                             "model.name=small_cnn", "eval.attacks=[]"])
    run = build_run(cfg)
    assert run.augment is random_crop_flip
    val = datasets(cfg, ("val", "test"))
    got = torch.cat([x for x, _ in run.val_loader])
    assert torch.equal(got, val["val"].tensors()[0])
    # test images come from the dataset as they are; the evaluation suite takes no augmentation
    assert torch.equal(torch.stack([val["test"][i][0] for i in range(4)]), val["test"].tensors()[0][:4])
    assert build_augment("none") is None and build_augment("imagenet") is None


# ------------------------------------------------------------------ β's learning rate


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_beta_lr_equals_the_model_lr_at_every_epoch(schedule, make_cnn):
    train = torch.utils.data.Subset(DATASETS["digits"](split="train"), range(64))
    optim = OptimConfig(lr=0.08, schedule=schedule, milestones=(0.25, 0.5))
    method = build_method("sprout", {}, num_classes=10, lr=0.08)
    seen: list[dict[str, float]] = []
    fit(make_cnn(), method, train, None, epochs=4, batch_size=32, optim=optim, log=lambda e, m: seen.append(m))
    want = [lr_at(e, 4, optim) for e in range(4)]
    assert [m["train/lr"] for m in seen] == want
    assert [m["sprout/beta_lr"] for m in seen] == want
    assert len(set(want)) > 1  # the schedule did decay
    # an explicit sprout.beta_lr is scaled by the same schedule
    method = build_method("sprout", {"beta_lr": 0.5}, num_classes=10, lr=0.08)
    seen.clear()
    fit(make_cnn(), method, train, None, epochs=4, batch_size=32, optim=optim, log=lambda e, m: seen.append(m))
    assert [m["sprout/beta_lr"] for m in seen] == pytest.approx([0.5 * w / 0.08 for w in want])


# ------------------------------------------------------------------ checkpoint selection


def test_selection_metric_is_clean_accuracy_for_non_robust_methods():
    assert {n: METHODS[n].selection_metric for n in METHODS} == {
        "natural": "val/clean_acc", "label_smoothing": "val/clean_acc", "sprout": "val/pgd_acc",
        "pgd_at": "val/pgd_acc", "trades": "val/pgd_acc", "free_at": "val/pgd_acc", "fgsm_rs": "val/pgd_acc"}


# ------------------------------------------------------------------ Dirichlet floor and projection


def test_small_beta_gradient_agrees_with_torch_dirichlet_rsample():
    """β driven to its projection bound still gets exactly torch's reparameterised gradient from
    the rows that put no label mass on it (before the fix it was absorbed at β_min = 1e-3 with
    a zero gradient: s·α·β = 1e-5 lay under the 1e-4 floor)."""
    method = build_method("sprout", {}, num_classes=10, lr=0.1)
    p = method.params
    with torch.no_grad():
        method.beta.fill_(1e-6)
    method.beta.grad = torch.zeros(10)
    method.after_step()  # the projection
    assert (method.beta > 0).all()
    floor = float(method.beta.detach()[0])
    assert p.dirichlet_scale * p.dirichlet_alpha * floor >= MIN_CONCENTRATION
    # no label mass on classes 5..9; many rows, since at c ≈ 1e-4 only rare draws carry gradient
    y = F.one_hot(torch.arange(4000) % 5, 10).float()
    logits = torch.randn(4000, 10, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in ("ours", "torch"):
        beta = method.beta.detach().clone().requires_grad_(True)
        torch.manual_seed(9)
        if fn == "ours":
            t = dirichlet_targets(y, beta, p.dirichlet_alpha, p.dirichlet_scale)
        else:
            c = dirichlet_concentration(y, beta, p.dirichlet_alpha, p.dirichlet_scale, torch.float64)
            t = torch.distributions.Dirichlet(c).rsample().float()
        soft_cross_entropy(logits, t).backward()
        grads.append(beta.grad)
    ours, ref = grads
    assert ref[5:].abs().sum() > 0 and ours[5:].abs().sum() > 0
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-7 * ref.abs().max())


def test_float64_labels_leave_the_other_branch_gradient_intact():
    """The sampler's backward must not write into the incoming gradient (shared with w here)."""
    g = torch.Generator().manual_seed(0)
    y = F.one_hot(torch.randint(10, (16,), generator=g), 10).double()
    beta = (torch.rand(10, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    w = torch.zeros(16, 10, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(16, 10, generator=g, dtype=torch.float64)
    expected = upstream.clone()  # an in-place write would change `upstream` itself too
    (dirichlet_targets(y, beta, 0.3, 2.0) + w).backward(upstream)
    assert torch.equal(w.grad, expected) and torch.equal(upstream, expected)
    assert beta.grad is not None and beta.grad.abs().sum() > 0


# ------------------------------------------------------------------ the authors' released code


def _authors_dirismooth(outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
    """IBM/SPROUT main_cus.py ``dirismooth``, verbatim in substance: Dir(10·y + u), one draw."""
    one_hot = torch.zeros_like(outputs).scatter(1, targets.view(-1, 1), 1)
    alpha = (one_hot * 10 + u).clamp(min=0)
    sample = torch.distributions.Dirichlet(alpha.double()).rsample()
    log_prb = F.log_softmax(outputs, dim=1)
    return -(sample.float() * log_prb).sum() / outputs.shape[0]


def test_reference_preset_loss_equals_the_authors_formula_on_fixed_draws(make_cnn, digits_batch):
    from orchestrator.config import load_config
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "configs" / "sprout_reference_code.yaml", [f"data.root={ROOT}"])
    p: SproutParams = cfg.sprout
    assert (p.target_mix, p.beta_update, p.theta_steps, p.beta_init) == ("endpoints", "clean_pass", 3, "ones")
    assert (p.beta_momentum, p.beta_weight_decay, cfg.train.lr) == (0.9, 5e-4, 0.01)
    x, y = digits_batch
    model = make_cnn().train()
    g = torch.Generator().manual_seed(4)
    noise, perm, lam = torch.randn(x.shape, generator=g), torch.randperm(x.shape[0], generator=g), 0.3
    beta = torch.ones(10)
    torch.manual_seed(11)
    ours, _, _ = sprout_loss(model, x, y, beta, p, 10, noise=noise, lam=lam, perm=perm)
    # the authors: x + σ·n, mixed with x[π] by λ; λ·dirismooth(y_a) + (1−λ)·dirismooth(y_b), y_a's draw first
    xn = x + p.gaussian_delta * noise
    out = model(lam * xn + (1 - lam) * xn[perm])
    torch.manual_seed(11)
    theirs = lam * _authors_dirismooth(out, y, beta) + (1 - lam) * _authors_dirismooth(out, y[perm], beta)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
    assert (y != y[perm]).sum() > 10  # mixed rows with two different labels are in there
    # eq. 6's single Dir(c(y_mix)) is a different loss on the same draws: the switch matters
    torch.manual_seed(11)
    eq6, _, _ = sprout_loss(model, x, y, beta, dataclasses.replace(p, target_mix="label"), 10, noise=noise, lam=lam,
                            perm=perm)
    assert abs(float(eq6) - float(theirs)) > 1e-4


def test_reference_clean_pass_updates_beta_once_per_minibatch_like_the_authors(make_cnn, digits_train):
    """theta_steps θ-updates, then one β ascent step on the clean batch (SGD momentum, weight decay)."""
    params = {"beta_update": "clean_pass", "theta_steps": 3, "beta_momentum": 0.9, "beta_weight_decay": 5e-4,
              "beta_init": "ones", "dirichlet_scale": 11.0, "dirichlet_alpha": 1 / 11}
    method = build_method("sprout", params, num_classes=10, lr=0.05)
    model = make_cnn().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    # the authors' β: minimise −dirismooth on the clean batch with SGD(momentum 0.9, weight decay 5e-4)
    u = torch.ones(10, requires_grad=True)
    sgd_u = torch.optim.SGD([u], lr=0.05, momentum=0.9, weight_decay=5e-4)
    for batch in range(2):  # two minibatches: the momentum buffer matters from the second on
        x, y = digits_train[0][batch * 32:(batch + 1) * 32], digits_train[1][batch * 32:(batch + 1) * 32]
        start = method.beta.detach().clone()
        for k in range(3):
            opt.zero_grad()
            method.loss(model, x, y).loss.backward()
            assert method.beta.grad is None  # the θ-steps give β no gradient in this mode
            opt.step()
            if k < 2:
                method.after_step()
                assert torch.equal(method.beta.detach(), start)  # not yet: once per minibatch
        rng = torch.get_rng_state()
        with torch.no_grad():
            out = model(x)
        sgd_u.zero_grad()
        (-_authors_dirismooth(out, y, u)).backward()
        sgd_u.step()
        torch.set_rng_state(rng)
        method.after_step()
        assert torch.allclose(method.beta.detach(), u.detach(), rtol=1e-5, atol=1e-7), batch
        assert not torch.equal(method.beta.detach(), start)


# ------------------------------------------------------------------ uniform LS ablation, Free-AT


def test_uniform_ls_ablation_is_sprout_with_uniform_targets_of_the_same_alpha(make_cnn, digits_batch):
    x, y = digits_batch
    p = {"use_gaussian": False, "use_mixup": False, "use_dirichlet": False, "uniform_smoothing": True,
         "dirichlet_alpha": 0.01}
    method = build_method("sprout", p, num_classes=10, lr=0.1)
    model = make_cnn()
    got = method.loss(model, x, y).loss
    want = soft_cross_entropy(model(x), 0.99 * F.one_hot(y, 10).float() + 0.01 / 10)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(ValueError, match="sprout.uniform_smoothing"):
        build_method("sprout", {"uniform_smoothing": True}, num_classes=10, lr=0.1)


def test_free_at_with_eval_bn_mode_still_trains_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10)).train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(10, (16,))
    method = FreeAT(FreeATParams(eps=0.1, replays=2, bn_mode="eval"))
    before = model[1].running_mean.clone()
    twin = copy.deepcopy(model).eval()  # δ's gradient: the attack's eval-mode pass at δ = 0
    x0 = x.clone().requires_grad_(True)
    (grad_eval,) = torch.autograd.grad(F.cross_entropy(twin(x0), y), x0)
    out = method.loss(model, x, y)
    out.loss.backward()
    method.after_step()
    assert model.training
    assert not torch.equal(model[1].running_mean, before)  # the θ forward ran in train mode
    assert torch.equal(method.delta, 0.1 * grad_eval.sign())  # δ moved by ε·sign(∇δ) of the eval pass
