"""The evaluation suite runner: exact counts, shards that add up to the unsharded run, seeded
determinism, SPEC §5 metric names, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trainables import DATASETS, MODELS
from trainables.evaluation import SUITE_ATTACKS, EvalConfig, EvalResult, example_indices, run_suite, shard_blocks
from trainables.loop import OptimConfig, fit
from trainables.methods import build_method

SPEC_TEST_METRICS = {"test/clean_acc", "test/pgd20_acc", "test/pgd100_acc", "test/cw_linf_acc", "test/cw_l2_acc",
                     "test/autoattack_acc", "test/transfer_acc", "test/rotation_acc", "test/brightness_acc",
                     "test/contrast_acc", "test/gray_acc"}


def _train(seed: int) -> nn.Module:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = MODELS["small_cnn"](num_classes=10, in_channels=1, mean=(0.305,), std=(0.375,), width=16)
    fit(model, build_method("natural", {}, num_classes=10, lr=0.05), DATASETS["digits"](split="train", seed=seed), None,
        epochs=3, batch_size=64, optim=OptimConfig(lr=0.05), seed=seed)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module]:
    return _train(0), _train(1)


@pytest.fixture(scope="module")
def test_set():
    return DATASETS["digits"](split="test")


# every suite attack, with budgets small enough for a few seconds on one CPU thread
SMALL = EvalConfig(eps=0.1, n_examples=45, batch_size=10, pgd_restarts=2, cw_l2_search_steps=2, cw_l2_max_iter=20,
                   cw_l2_initial_const=0.1, cw_l2_budgets=(0.5, 1.0), autoattack_attacks=("apgd-ce", "square"), autoattack_square_queries=100,
                   targeted_eps=(0.05, 0.1), targeted_steps=5, curve_eps=(0.05,), masking_square_queries=100)
ALL = ["pgd20", "cw_linf", "cw_l2", "autoattack", "transfer", "invariance", "targeted", "masking_checks"]


def test_shards_sum_to_the_unsharded_counts_exactly(models, test_set):
    model, source = models
    whole = run_suite(model, test_set, ALL, SMALL, source_model=source)
    shards = [run_suite(model, test_set, ALL, SMALL, source_model=source, shard=i, num_shards=3) for i in range(3)]
    merged = sum(shards)
    assert merged.complete and not shards[0].complete
    assert merged.counts == whole.counts
    assert merged.metrics().keys() == whole.metrics().keys()
    assert all(merged.metrics()[k] == v for k, v in whole.metrics().items() if not k.startswith("time/"))
    assert whole.counts["test/clean_acc"][1] == 45
    assert sum(s.counts["test/clean_acc"][1] for s in shards) == 45
    # the sharded result went through a plain dict (how it travels between workers) unchanged
    assert EvalResult.from_dict(shards[1].to_dict()).counts == shards[1].counts


def test_metrics_use_the_spec_names_and_are_fractions(models, test_set):
    model, source = models
    cfg = EvalConfig(eps=0.1, n_examples=20, batch_size=20, cw_l2_search_steps=1, cw_l2_max_iter=10,
                     autoattack_attacks=("apgd-ce",))
    r = run_suite(model, test_set, ["clean", "pgd20", "pgd100", "cw_linf", "cw_l2", "autoattack", "transfer",
                                    "invariance"], cfg, source_model=source)
    m = r.metrics()
    assert SPEC_TEST_METRICS <= set(m)
    assert all(0.0 <= m[k] <= 1.0 for k in SPEC_TEST_METRICS)
    assert all(k.startswith(("test/", "masking/", "time/eval_")) for k in m)
    assert m["test/clean_acc"] == r.counts["test/clean_acc"][0] / 20
    # paper Fig. 7's points: accuracy at the evaluation ε against the number of PGD steps
    assert r.steps_curve() == [(20, m["test/pgd20_acc"]), (100, m["test/pgd100_acc"])]


def test_seeded_runs_are_identical_and_seed_matters(models, test_set):
    model, _ = models
    cfg = EvalConfig(eps=0.1, n_examples=60, batch_size=30, pgd_restarts=1)
    a = run_suite(model, test_set, ["pgd20"], cfg)
    b = run_suite(model, test_set, ["pgd20"], cfg)
    assert a.counts == b.counts
    assert list(example_indices(len(test_set), 60, 0)) != list(example_indices(len(test_set), 60, 1))


def test_tensor_pair_and_dataset_give_the_same_counts(models, test_set):
    model, _ = models
    cfg = EvalConfig(eps=0.1, n_examples=30, batch_size=16)
    assert run_suite(model, test_set, ["pgd20"], cfg).counts == run_suite(model, test_set.tensors(), ["pgd20"], cfg).counts

    class Plain(torch.utils.data.Dataset):  # no .tensors(): items are fetched one by one
        def __len__(self):
            return len(test_set)

        def __getitem__(self, i):
            return test_set[i]

    assert run_suite(model, Plain(), ["pgd20"], cfg).counts == run_suite(model, test_set, ["pgd20"], cfg).counts


def test_shard_blocks_partition_the_examples():
    for n, bs, k in [(45, 10, 3), (7, 10, 2), (100, 7, 4), (5, 1, 5)]:
        covered = [p for s in range(k) for _, a, b in shard_blocks(n, bs, s, k) for p in range(a, b)]
        assert sorted(covered) == list(range(n))
    with pytest.raises(ValueError, match="shard"):
        shard_blocks(10, 5, 2, 2)
    idx = example_indices(100, 30, 7)
    assert len(idx) == 30 and len(set(idx)) == 30 and np.all(np.diff(idx) > 0)
    assert list(example_indices(10, None, 0)) == list(range(10))


def test_merge_refuses_mismatched_or_overlapping_results(models, test_set):
    model, _ = models
    a = run_suite(model, test_set, [], EvalConfig(n_examples=20, batch_size=10), shard=0, num_shards=2)
    b = run_suite(model, test_set, [], EvalConfig(n_examples=20, batch_size=10), shard=1, num_shards=2)
    other = run_suite(model, test_set, [], EvalConfig(n_examples=20, batch_size=10, eps=0.2), shard=1, num_shards=2)
    assert (a + b).counts["test/clean_acc"][1] == 20
    with pytest.raises(ValueError, match="twice"):
        a.merge(a)
    with pytest.raises(ValueError, match="different configs"):
        a.merge(other)


def test_errors_and_progress(models, test_set, capsys):
    model, _ = models
    with pytest.raises(ValueError, match="unknown eval attack"):
        run_suite(model, test_set, ["pgd7"])
    with pytest.raises(ValueError, match="source model"):
        run_suite(model, test_set, ["transfer"])
    with pytest.raises(ValueError, match="batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(ValueError, match="invariance"):
        EvalConfig(invariance=("blur",))
    assert set(SUITE_ATTACKS) == {"pgd20", "pgd100", "pgd200", "cw_linf", "cw_l2", "autoattack", "transfer",
                                  "invariance", "targeted", "masking_checks"}
    seen, per_attack = [], []
    run_suite(model, test_set, ["invariance", "pgd20"], EvalConfig(n_examples=20, batch_size=10, progress=True),
              on_block=lambda done, total: seen.append((done, total)),
              on_attack=lambda name, done, total: per_attack.append((name, done, total)))
    assert seen == [(1, 2), (2, 2)]
    # each attack reports each block it finished (what the console's per-model, per-attack view reads)
    assert per_attack == [("clean", 1, 2), ("invariance", 1, 2), ("pgd20", 1, 2),
                          ("clean", 2, 2), ("invariance", 2, 2), ("pgd20", 2, 2)]
    assert "eval shard 0/1" in capsys.readouterr().err
    # the caller's training mode survives the suite
    model.train()
    run_suite(model, test_set, ["pgd20"], EvalConfig(n_examples=10, batch_size=10))
    assert model.training
    model.eval()


def test_step_size_rules():
    assert EvalConfig(eps=0.1).step_size(0.1, 20) == pytest.approx(2.5 * 0.1 / 20)
    assert EvalConfig(eps=0.1, pgd_step_rule="eps/5").step_size(0.1, 20) == pytest.approx(0.02)
    assert EvalConfig(pgd_step_size=0.003).step_size(0.1, 20) == 0.003
