"""Gradient-masking checks: a non-differentiable input quantiser in front of a natural model is
flagged (white-box PGD stalls, Square and transfer succeed), a plain natural model is not."""

from __future__ import annotations

import torch

from trainables.attacks.autoattack import autoattack
from trainables.attacks.masking import masking_report
from trainables.evaluation import EvalConfig, run_suite

CFG = EvalConfig(eps=0.1, n_examples=64, batch_size=64, masking_square_queries=500)


def test_quantised_model_raises_the_masking_flag(masked_model, natural_model, digits_test):
    r = run_suite(masked_model, digits_test, ["pgd20", "masking_checks"], CFG, source_model=natural_model)
    report = r.masking()
    assert report.flagged
    assert report.flags["square"] and report.flags["transfer"] and report.flags["large_eps"]
    m = r.metrics()
    assert m["masking/flagged"] == 1.0 and m["masking/square_flag"] == 1.0
    assert m["masking/square_acc"] < m["test/pgd20_acc"] - CFG.masking_margin
    assert "GRADIENT MASKING SUSPECTED" in r.summary()
    assert r.tags()["gradient_masking"] == "flagged" and "Square" in r.tags()["gradient_masking_reasons"]


def test_natural_model_passes_the_masking_checks(natural_model, natural_model_b, digits_test):
    r = run_suite(natural_model, digits_test, ["pgd20", "transfer", "masking_checks"], CFG, source_model=natural_model_b)
    report = r.masking()
    assert set(report.flags) == {"large_eps", "square", "transfer"}
    assert not report.flagged, report.reasons
    assert r.metrics()["masking/flagged"] == 0.0
    assert r.metrics()["masking/large_eps_acc"] <= CFG.masking_zero_tol
    assert "passed" in r.summary()
    assert r.tags() == {"gradient_masking": "passed"}


def test_autoattack_own_checks_flag_zero_gradients(masked_model, natural_model, digits_test):
    x, y = digits_test[0][:32], digits_test[1][:32]
    # pyautoattack checks for zero gradients in its DLR-loss APGD
    masked = autoattack(masked_model, x, y, eps=0.1, attacks_to_run=["apgd-dlr"], batch_size=32)
    assert any("zero gradient" in w for w in masked.warnings)
    plain = autoattack(natural_model, x, y, eps=0.1, attacks_to_run=["apgd-dlr"], batch_size=32)
    assert plain.warnings == []
    rep = masking_report({"test/autoattack_apgd_dlr_acc": 0.9}, autoattack_warnings=masked.warnings)
    assert rep.flags == {"autoattack": True} and rep.flagged


def test_masking_report_thresholds():
    ok = masking_report({"test/pgd20_acc": 0.40, "masking/square_acc": 0.39, "test/transfer_acc": 0.60,
                         "masking/large_eps_acc": 0.01})
    assert not ok.flagged and set(ok.flags) == {"large_eps", "square", "transfer"}
    bad = masking_report({"test/pgd20_acc": 0.40, "test/cw_linf_acc": 0.35, "masking/square_acc": 0.30,
                          "test/transfer_acc": 0.36, "masking/large_eps_acc": 0.2, "masking/autoattack_square_gain": 0.01},
                         margin=0.02, zero_tol=0.05)
    # white-box reference is the strongest white-box attack (C&W-ℓ∞ 0.35): transfer 0.36 does not beat it
    assert bad.flags == {"large_eps": True, "square": True, "transfer": False, "autoattack": True}
    assert bad.numbers["whitebox_ref_acc"] == 0.35
    assert len(bad.reasons) == 3
    assert masking_report({}).flags == {}


def test_every_attack_stays_in_ball_and_box(natural_model, natural_model_b, digits_test):
    from trainables import ATTACKS

    x, y = digits_test[0][:48], digits_test[1][:48]
    eps = 0.15
    attacks = {
        "pgd": ATTACKS["pgd"](eps=eps, steps=10, restarts=2),
        "cw_linf": ATTACKS["cw_linf"](eps=eps, steps=10, restarts=2),
        "transfer": ATTACKS["transfer"](source=natural_model_b, eps=eps, steps=10),
        "targeted": ATTACKS["targeted"](eps=eps, steps=10),
        "fgsm_rs": ATTACKS["fgsm_rs"](eps=eps, step_size=1.25 * eps),
    }
    for name, attack in attacks.items():
        x_adv = attack(natural_model, x, y)
        assert x_adv.shape == x.shape, name
        assert (x_adv - x).abs().max() <= eps + 1e-6, name
        assert x_adv.min() >= 0 and x_adv.max() <= 1, name
    # AutoAttack's stages (FAB-T is the costly one), on fewer points
    aa = ATTACKS["autoattack"](eps=eps, attacks_to_run=["apgd-ce", "fab-t", "square"], square_queries=300)
    x_aa = aa(natural_model, x[:12], y[:12])
    assert (x_aa - x[:12]).abs().max() <= eps + 1e-6 and x_aa.min() >= 0 and x_aa.max() <= 1
    x_l2 = ATTACKS["cw_l2"](budget=1.0, search_steps=2, max_iter=30, initial_const=0.1)(natural_model, x, y)
    assert (x_l2 - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-5
    assert x_l2.min() >= 0 and x_l2.max() <= 1
    assert torch.all(natural_model.training == torch.tensor(False))


def test_quantised_model_is_flagged_per_example(masked_model, natural_model, digits_test):
    """The per-example counts: examples Square / transfer break that every white-box attack left correct."""
    r = run_suite(masked_model, digits_test, ["pgd20", "masking_checks"], CFG, source_model=natural_model)
    acc = r.accuracies()
    assert acc["masking/square_only_broken"] > CFG.masking_margin
    assert acc["masking/transfer_only_broken"] > CFG.masking_margin
    report = r.masking()
    assert report.flags["square"] and report.flags["transfer"]
    assert any("per example" in reason for reason in report.reasons)


def test_per_example_flags_fire_when_aggregates_agree():
    """Square breaks other points than PGD: equal aggregate accuracies, yet masking."""
    acc = {"test/pgd20_acc": 0.40, "masking/square_acc": 0.40, "masking/square_only_broken": 0.10,
           "masking/large_eps_acc": 0.0}
    rep = masking_report(acc)
    assert rep.flags["square"] and rep.numbers["square_only_broken"] == 0.10
    assert not masking_report({**acc, "masking/square_only_broken": 0.0}).flags["square"]


def test_large_eps_tolerance_scales_with_the_number_of_classes():
    """At K = 1000 (ImageNet) chance is 0.001 < the default 0.05: the flag must still be able to fire."""
    acc = {"masking/large_eps_acc": 0.02}
    assert not masking_report(acc).flags["large_eps"]
    assert masking_report(acc, num_classes=1000).flags["large_eps"]
    assert not masking_report({"masking/large_eps_acc": 0.0}, num_classes=1000).flags["large_eps"]


def test_masking_helpers_score_in_eval_mode_whatever_the_callers_mode(natural_model, digits_test):
    from torch import nn

    from trainables.attacks.masking import whitebox_and_blackbox_correct

    x, y = digits_test[0][:24], digits_test[1][:24]
    import copy

    model = nn.Sequential(copy.deepcopy(natural_model), nn.Dropout(0.9)).eval()  # the fixture stays untouched
    kw = dict(eps=0.1, large_eps=0.5, steps=5, square_queries=50, generator=None, seed=0)
    torch.manual_seed(0)
    ref = whitebox_and_blackbox_correct(model, x, y, **kw)
    model.train()  # dropout on: unless forced to eval mode, predictions would be noise
    torch.manual_seed(0)
    got = whitebox_and_blackbox_correct(model, x, y, **kw)
    assert model.training and got == ref
