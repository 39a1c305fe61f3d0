"""Transfer (crafted on a source model) and random-targeted PGD (ImageNet protocol)."""

from __future__ import annotations

import torch

from trainables.attacks.targeted import IMAGENET_EPS, random_wrong_targets, targeted_pgd
from trainables.attacks.transfer import transfer_correct, transfer_pgd
from trainables.evaluation import EvalConfig, run_suite


def test_random_wrong_targets_are_wrong_seeded_and_cover_all_classes():
    y = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(0))
    t1 = random_wrong_targets(y, 10, torch.Generator().manual_seed(5))
    t2 = random_wrong_targets(y, 10, torch.Generator().manual_seed(5))
    assert torch.equal(t1, t2)
    assert not torch.any(t1 == y)
    assert set(t1.tolist()) == set(range(10))
    assert IMAGENET_EPS == (0.005, 0.01, 0.015, 0.02)


def test_targeted_pgd_reaches_its_targets_inside_the_ball(natural_model, digits_test):
    x, y = digits_test[0][:100], digits_test[1][:100]
    x_adv, t = targeted_pgd(natural_model, x, y, eps=0.4, steps=40, generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 0.4 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        pred = natural_model(x_adv).argmax(1)
    assert (pred == t).float().mean() >= 0.8


def test_targeted_accuracy_in_suite_falls_with_eps(natural_model, digits_test):
    cfg = EvalConfig(n_examples=100, batch_size=50, targeted_eps=(0.0, 0.1, 0.3))
    r = run_suite(natural_model, digits_test, ["targeted"], cfg)
    accs = [r.counts[f"test/targeted_acc_eps{e:g}"][0] for e in (0.0, 0.1, 0.3)]
    assert accs[0] == r.counts["test/clean_acc"][0]
    assert accs[0] >= accs[1] >= accs[2]
    assert accs[2] < accs[0]


def test_transfer_uses_the_source_gradients(natural_model, natural_model_b, digits_test):
    x, y = digits_test[0][:100], digits_test[1][:100]
    x_adv = transfer_pgd(natural_model_b, x, y, eps=0.2, generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    c = transfer_correct(natural_model_b, natural_model, x, y, eps=0.2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert c == int((natural_model(x_adv).argmax(1) == y).sum())
        clean = int((natural_model(x).argmax(1) == y).sum())
        white = int((natural_model_b(x_adv).argmax(1) == y).sum())
    assert white < c < clean  # transfers, but less than against the source itself
