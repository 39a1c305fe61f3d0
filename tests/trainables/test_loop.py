"""The single-process loop: resuming from a checkpoint continues bit-for-bit (CPU, fixed
seeds), learning-rate schedules, and the non-finite-loss guard."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Subset

from trainables import DATASETS
from trainables.checkpoint import load_checkpoint, model_state_from
from trainables.data.augment import random_crop_flip
from trainables.loop import NonFiniteLossError, OptimConfig, fit, lr_at, train_epoch
from trainables.methods import build_method

CPU = torch.device("cpu")
# (method, params, epochs as configured): free_at's epochs are divided by its m = 2 replays
CASES = [
    ("natural", {}, 4),
    ("sprout", {"beta_lr": 0.5}, 4),
    ("free_at", {"replays": 2, "eps": 0.1}, 8),
    ("natural+augment", {}, 4),  # data.augment: standard (pad-4 crop + flip) stays replayable
]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def small_sets():
    train = Subset(DATASETS["digits"](split="train", seed=0), range(160))
    val = Subset(DATASETS["digits"](split="val", seed=0), range(40))
    return train, val


def run(make_cnn, sets, name, params, epochs, ckpt=None, stop_after=None, optim=None):
    """fit() from a fresh model; ``stop_after`` epochs kills it (after that epoch's checkpoint)."""
    model = make_cnn(seed=0)
    augment = random_crop_flip if name.endswith("+augment") else None
    method = build_method(name.removesuffix("+augment"), params, num_classes=10, lr=0.05, seed=0)

    def log(epoch, metrics):
        if stop_after is not None and epoch + 1 == stop_after:
            raise Interrupted

    optim = optim or OptimConfig(lr=0.05)
    try:
        hist = fit(model, method, sets[0], sets[1], epochs=epochs, batch_size=48, optim=optim, seed=3,
                   checkpoint_dir=ckpt, log=log, augment=augment)
    except Interrupted:
        hist = None
    return model, method, hist


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same(a, b, path="state") -> None:
    """Recursive equality; tensors bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("name,params,epochs", CASES)
def test_resume_after_an_interruption_equals_an_uninterrupted_run_bitwise(name, params, epochs, small_sets,
                                                                          make_cnn, tmp_path):
    straight, m_straight, hist_straight = run(make_cnn, small_sets, name, params, epochs, ckpt=tmp_path / "a")
    runs = len(hist_straight)
    assert runs >= 2
    half = runs // 2
    _, _, none = run(make_cnn, small_sets, name, params, epochs, ckpt=tmp_path / "b", stop_after=half)
    assert none is None and load_checkpoint(tmp_path / "b")["epoch"] == half - 1
    resumed, m_resumed, hist_resumed = run(make_cnn, small_sets, name, params, epochs, ckpt=tmp_path / "b")
    assert len(hist_resumed) == runs - half  # only the remaining epochs ran
    assert_same_state(straight.state_dict(), resumed.state_dict())
    for k in ("train/loss", "train/acc", "val/clean_acc"):
        assert [h[k] for h in hist_straight[half:]] == [h[k] for h in hist_resumed]
    # the method's own state: β (and its optimizer) for SPROUT, δ for Free-AT
    assert_same(m_straight.state_dict(), m_resumed.state_dict())
    if name == "sprout":
        assert not torch.equal(m_resumed.beta.detach(), build_method(name, params, num_classes=10, lr=0.05).beta.detach())
    if name == "free_at":
        assert m_straight.delta.abs().sum() > 0 and torch.equal(m_straight.delta, m_resumed.delta)
    # the optimizer state (momentum buffers) of both final checkpoints agrees too
    sa, sb = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert sa["epoch"] == sb["epoch"] == runs - 1
    assert sa["optimizer"]["state"] and all("momentum_buffer" in st for st in sa["optimizer"]["state"].values())
    assert_same(sa["optimizer"], sb["optimizer"])
    assert_same(sa["method"], sb["method"])


def test_extending_a_finished_run_with_a_constant_schedule_equals_training_longer(small_sets, make_cnn, tmp_path):
    """2 epochs, then ``fit(epochs=4)`` on the same directory == 4 epochs straight (constant lr)."""
    optim = OptimConfig(lr=0.05, schedule="constant")
    straight, _, _ = run(make_cnn, small_sets, "sprout", {}, 4, optim=optim)
    run(make_cnn, small_sets, "sprout", {}, 2, ckpt=tmp_path, optim=optim)
    resumed, _, hist = run(make_cnn, small_sets, "sprout", {}, 4, ckpt=tmp_path, optim=optim)
    assert len(hist) == 2
    assert_same_state(straight.state_dict(), resumed.state_dict())


def test_a_different_seed_gives_different_weights(small_sets, make_cnn):
    """The bitwise comparisons above are not vacuous: the seed does change the result."""
    a = make_cnn(seed=0)
    b = make_cnn(seed=0)
    for model, seed in ((a, 3), (b, 4)):
        fit(model, build_method("natural", {}, num_classes=10, lr=0.05), small_sets[0], None, epochs=1,
            batch_size=48, optim=OptimConfig(lr=0.05), seed=seed)
    assert not torch.equal(a.state_dict()["net.0.weight"], b.state_dict()["net.0.weight"])


def test_checkpoint_weights_serve_as_init_from(small_sets, make_cnn, tmp_path):
    model, _, _ = run(make_cnn, small_sets, "natural", {}, 1, ckpt=tmp_path)
    fresh = make_cnn(seed=5)
    fresh.load_state_dict(model_state_from(tmp_path))
    assert_same_state(fresh.state_dict(), model.state_dict())


def test_lr_schedules():
    cos = OptimConfig(lr=0.1, schedule="cosine")
    assert [lr_at(e, 4, cos) for e in range(4)] == pytest.approx(
        [0.05 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    step = OptimConfig(lr=0.1, schedule="step", milestones=(0.5, 0.75), gamma=0.1)
    assert [lr_at(e, 8, step) for e in range(8)] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    warm = OptimConfig(lr=0.1, schedule="constant", warmup_epochs=2)
    assert [lr_at(e, 5, warm) for e in range(4)] == pytest.approx([0.05, 0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="train.schedule"):
        lr_at(0, 4, OptimConfig(schedule="linear"))


def test_non_finite_loss_names_epoch_step_and_method(make_cnn):
    model = make_cnn()
    method = build_method("natural", {}, num_classes=10, lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.full((4, 1, 8, 8), float("nan"))
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, step 1 \(method natural\)"):
        train_epoch(model, method, opt, [(x, y)], CPU, epoch=2, seed=0)
