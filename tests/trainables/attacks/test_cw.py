"""C&W attacks: ℓ∞ on the margin loss really moves; ℓ2 perturbations respect the budget they are
counted under and shrink (never grow) with more binary-search steps."""

from __future__ import annotations

import torch

from trainables.attacks.cw import cw_l2, cw_linf
from trainables.evaluation import EvalConfig, example_indices, run_suite


def _subset(data, n):
    x, y = data
    idx = torch.as_tensor(example_indices(len(y), n, 0))
    return x[idx], y[idx]


def test_cw_linf_breaks_a_natural_model_and_stays_in_ball(natural_model, digits_test):
    x, y = _subset(digits_test, 100)
    x_adv = cw_linf(natural_model, x, y, eps=0.3, steps=20, generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        acc = (natural_model(x_adv).argmax(1) == y).float().mean().item()
    assert acc <= 0.05  # the margin's gradient must not vanish on still-correct points
    assert natural_model.training is False


def test_cw_l2_respects_budgets_and_box(natural_model, digits_test):
    x, y = _subset(digits_test, 32)
    res = cw_l2(natural_model, x, y, search_steps=4, max_iter=60, initial_const=0.1)
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    with torch.no_grad():
        pred = natural_model(res.x_adv).argmax(1)
    found = res.found
    assert found.float().mean() > 0.5
    # every example counted as broken really is misclassified at the recorded distance
    l2 = (res.x_adv - x).flatten(1).norm(dim=1)
    assert torch.all(pred[found] != y[found])
    assert torch.allclose(l2[found], res.l2[found], atol=1e-5)
    for b in (0.25, 0.5, 1.0, 2.0):
        broken = ~res.robust_at(b)
        assert torch.all(l2[broken] <= b + 1e-5)
    accs = res.accuracy_at([0.25, 0.5, 1.0, 2.0])
    assert list(accs.values()) == sorted(accs.values(), reverse=True)
    assert accs[0.25] > accs[2.0]


def test_cw_l2_shrinks_with_more_search_steps(natural_model, digits_test):
    x, y = _subset(digits_test, 32)
    few = cw_l2(natural_model, x, y, search_steps=2, max_iter=40, initial_const=0.1)
    more = cw_l2(natural_model, x, y, search_steps=5, max_iter=40, initial_const=0.1)
    assert torch.all(more.l2 <= few.l2)
    assert more.found.sum() >= few.found.sum()
    finite = few.found
    assert more.l2[finite].mean() < few.l2[finite].mean()


def test_cw_l2_in_suite_counts_at_budgets(natural_model, digits_test):
    cfg = EvalConfig(n_examples=24, batch_size=24, cw_l2_search_steps=3, cw_l2_max_iter=40,
                     cw_l2_initial_const=0.1, cw_l2_budgets=(0.5, 1.0, 3.0))
    r = run_suite(natural_model, digits_test, ["cw_l2"], cfg)
    assert r.counts["test/cw_l2_acc"] == r.counts["test/cw_l2_acc_l2_0.5"]
    accs = [r.counts[f"test/cw_l2_acc_l2_{b:g}"][0] for b in (0.5, 1.0, 3.0)]
    assert accs == sorted(accs, reverse=True)
    assert accs[0] <= r.counts["test/clean_acc"][0]
