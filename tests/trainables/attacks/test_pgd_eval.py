"""PGD-ℓ∞ through the evaluation suite on digits: ε = 0 is clean accuracy, accuracy falls with ε
to ≈ 0, restarts never help the model, and PGD-AT is clearly more robust than natural training."""

from __future__ import annotations

import pytest

from trainables.evaluation import EvalConfig, eps_curve, run_suite, steps_curve

EPS_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)


def test_eps_zero_is_clean_accuracy_exactly(natural_model, digits_test):
    cfg = EvalConfig(eps=0.0, n_examples=200, batch_size=100)
    r = run_suite(natural_model, digits_test, ["pgd20", "cw_linf"], cfg)
    assert r.counts["test/pgd20_acc"] == r.counts["test/clean_acc"]
    assert r.counts["test/cw_linf_acc"] == r.counts["test/clean_acc"]
    assert r.counts["test/clean_acc"][1] == 200


@pytest.mark.parametrize("attack", ["pgd20", "cw_linf"])
def test_accuracy_falls_monotonically_in_eps_to_zero(natural_model, digits_test, attack):
    curve = eps_curve(natural_model, digits_test, EPS_GRID, attack=attack, config=EvalConfig(n_examples=200, batch_size=100))
    accs = [a for _, a in curve]
    clean = run_suite(natural_model, digits_test, [], EvalConfig(n_examples=200, batch_size=100)).accuracies()["test/clean_acc"]
    assert accs[0] == clean
    assert all(b <= a for a, b in zip(accs, accs[1:])), curve
    assert accs[-1] <= 0.05, curve
    assert accs[2] < clean - 0.2, "ε = 0.1 should clearly hurt a natural digits model"


def test_more_restarts_never_raise_accuracy(natural_model, digits_test):
    accs = []
    for restarts in (1, 2, 4):
        cfg = EvalConfig(eps=0.1, pgd_restarts=restarts, n_examples=100, batch_size=50)
        accs.append(run_suite(natural_model, digits_test, ["pgd20", "cw_linf"], cfg).counts)
    for key in ("test/pgd20_acc", "test/cw_linf_acc"):
        seq = [c[key][0] for c in accs]
        assert seq[0] >= seq[1] >= seq[2], (key, seq)


def test_suite_curve_eps_matches_standalone_runs(natural_model, digits_test):
    cfg = EvalConfig(eps=0.1, n_examples=100, batch_size=50, curve_eps=(0.05, 0.2))
    r = run_suite(natural_model, digits_test, ["pgd20"], cfg)
    pts = dict(r.curve("pgd20"))
    assert set(pts) == {0.05, 0.1, 0.2}
    assert pts[0.05] >= pts[0.1] >= pts[0.2]


def test_pgd_at_is_clearly_more_robust_than_natural_under_pgd(natural_model, pgd_at_model, digits_test):
    cfg = EvalConfig(eps=0.1, n_examples=100, batch_size=100)
    nat = run_suite(natural_model, digits_test, ["pgd20", "pgd100"], cfg).accuracies()
    at = run_suite(pgd_at_model, digits_test, ["pgd20", "pgd100"], cfg).accuracies()
    for k in ("test/pgd20_acc", "test/pgd100_acc"):
        assert at[k] >= nat[k] + 0.2, (k, nat[k], at[k])
    assert nat["test/pgd100_acc"] <= nat["test/pgd20_acc"] + 0.02


def test_steps_curve_is_seeded_and_reaches_plateau(natural_model, digits_test):
    cfg = EvalConfig(n_examples=100, batch_size=100)
    a = steps_curve(natural_model, digits_test, [1, 10, 50], eps=0.1, config=cfg)
    b = steps_curve(natural_model, digits_test, [1, 10, 50], eps=0.1, config=cfg)
    assert a == b
    assert [s for s, _ in a] == [1, 10, 50]
    assert a[-1][1] < a[0][1]
