"""AutoAttack via pyautoattack: stronger than PGD-20, quiet, seeded, inside the ε-ball; a PGD-AT
model is clearly more robust than a natural one under it."""

from __future__ import annotations

import logging

import pytest
import torch

from trainables.attacks.autoattack import autoattack, square
from trainables.evaluation import EvalConfig, example_indices, run_suite


def _subset(data, n, seed=0):
    x, y = data
    idx = torch.as_tensor(example_indices(len(y), n, seed))
    return x[idx], y[idx]


def test_standard_autoattack_not_weaker_than_pgd20(natural_model, digits_test, capsys):
    # ε = 0.15 leaves a few points unbroken, so all four standard attacks run, but cheaply
    x, y = _subset(digits_test, 32)
    cfg = EvalConfig(eps=0.15, batch_size=32)
    r = run_suite(natural_model, (x, y), ["pgd20", "autoattack"], cfg)
    counts = r.counts
    assert counts["test/autoattack_acc"][0] <= counts["test/pgd20_acc"][0]
    after = [counts[f"test/autoattack_{a}_acc"][0] for a in ("apgd_ce", "apgd_t", "fab_t", "square")]
    assert after == sorted(after, reverse=True)  # cumulative: each attack only removes points
    assert after[-1] == counts["test/autoattack_acc"][0]
    assert counts["test/autoattack_acc"][0] < counts["test/clean_acc"][0]
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_autoattack_stays_in_ball_and_box_and_is_seeded(natural_model, digits_test):
    x, y = _subset(digits_test, 24)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = autoattack(natural_model, x, y, eps=0.15, attacks_to_run=["apgd-ce", "apgd-t"], seed=3, batch_size=24)
    assert torch.equal(torch.get_rng_state(), before), "the caller's RNG must be restored"
    b = autoattack(natural_model, x, y, eps=0.15, attacks_to_run=["apgd-ce", "apgd-t"], seed=3, batch_size=24)
    assert torch.equal(a.x_adv, b.x_adv) and a.counts_after == b.counts_after
    assert (a.x_adv - x).abs().max() <= 0.15 + 1e-6
    assert a.x_adv.min() >= 0 and a.x_adv.max() <= 1
    with torch.no_grad():
        assert int((natural_model(a.x_adv).argmax(1) == y).sum()) == a.robust_count
    assert not logging.getLogger("auto-attack").handlers


def test_square_alone_is_black_box_and_in_ball(natural_model, digits_test):
    x, y = _subset(digits_test, 32)
    r = square(natural_model, x, y, eps=0.2, n_queries=300, seed=0, batch_size=32)
    assert list(r.counts_after) == ["square"]
    assert r.robust_count < r.clean_correct
    assert (r.x_adv - x).abs().max() <= 0.2 + 1e-6
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1


def test_pgd_at_clearly_more_robust_than_natural_under_autoattack(natural_model, pgd_at_model, digits_test):
    x, y = _subset(digits_test, 64)
    # AutoAttack's two untargeted APGD losses (CE and DLR); the targeted and FAB/Square stages on a
    # robust model cost minutes on CPU and are exercised on the natural model above
    nat = autoattack(natural_model, x, y, eps=0.1, attacks_to_run=["apgd-ce", "apgd-dlr"], seed=0, batch_size=64)
    at = autoattack(pgd_at_model, x, y, eps=0.1, attacks_to_run=["apgd-ce", "apgd-dlr"], seed=0, batch_size=64)
    assert at.robust_count >= nat.robust_count + 0.2 * 64, (nat.counts_after, at.counts_after)


def test_bad_options_are_clear_errors(natural_model, digits_test):
    x, y = _subset(digits_test, 4)
    with pytest.raises(ValueError, match="attacks_to_run"):
        autoattack(natural_model, x, y, attacks_to_run=["apgd-xx"])
    with pytest.raises(ValueError, match="norm"):
        autoattack(natural_model, x, y, norm="L7")
    with pytest.raises(ValueError, match="version"):
        autoattack(natural_model, x, y, version="rand")


def test_the_callers_tracer_survives_autoattacks_dynamic_check(natural_model, digits_test):
    import sys

    def tracer(frame, event, arg):  # a stand-in for coverage or a debugger
        return None

    x, y = _subset(digits_test, 4)
    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        autoattack(natural_model, x, y, eps=0.2, attacks_to_run=["apgd-ce"], batch_size=4)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(old)
