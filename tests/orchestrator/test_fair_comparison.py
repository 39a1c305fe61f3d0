"""Issue 13, orchestration side: per-method checkpoint selection, the comparison report naming
each row's augmentation and selection metric, and transfer sources (never a silent drop)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from orchestrator.config import ConfigError, load_config
from tests.conftest import DIGITS


class _Ckpt:
    def __init__(self, path: str) -> None:
        self.path = path


def _result(history: list[dict[str, float]]) -> SimpleNamespace:
    """A Ray Result look-alike: every epoch's checkpoint with the metrics it was reported with."""
    ckpts = [(_Ckpt(f"/ckpt/epoch-{m['epoch']}"), m) for m in history]
    return SimpleNamespace(best_checkpoints=ckpts, checkpoint=ckpts[-1][0])


# a natural run: PGD accuracy ≈ 0 and noisy, clean accuracy peaks at epoch 3
HISTORY = [
    {"epoch": 1, "val/clean_acc": 0.80, "val/pgd_acc": 0.004},
    {"epoch": 2, "val/clean_acc": 0.86, "val/pgd_acc": 0.011},
    {"epoch": 3, "val/clean_acc": 0.91, "val/pgd_acc": 0.000},
    {"epoch": 4, "val/clean_acc": 0.89, "val/pgd_acc": 0.002},
]


def test_a_natural_run_selects_its_checkpoint_by_clean_accuracy():
    from orchestrator.runner import best_checkpoint_path

    cfg = load_config(DIGITS, ["method=natural"])
    best = max(HISTORY, key=lambda m: m["val/clean_acc"])["epoch"]
    assert best_checkpoint_path(_result(HISTORY), cfg) == f"/ckpt/epoch-{best}" == "/ckpt/epoch-3"
    # a robust method keeps selecting by PGD accuracy: the argmax of its own metric
    robust = load_config(DIGITS, ["method=pgd_at"])
    assert best_checkpoint_path(_result(HISTORY), robust) == "/ckpt/epoch-2"


class _FakeClient:
    def get_run(self, run_id):
        return SimpleNamespace(data=SimpleNamespace(metrics={"time/train_total_s": 10.0, "time/accelerator_hours": 0.01}))

    def get_metric_history(self, run_id, key):
        return [SimpleNamespace(value=2.0)]


class _FakeResult:
    def __init__(self, acc: float) -> None:
        self.acc = acc

    def metrics(self):
        return {"test/clean_acc": self.acc, "test/pgd20_acc": self.acc / 2}

    def masking(self):
        return SimpleNamespace(flagged=False)


def test_the_report_names_each_rows_augmentation_and_selection_metric():
    from orchestrator.compare import comparison_rows, format_table

    base = ["data.name=cifar10", f"data.root={DIGITS.parent}"]
    cfgs = {m: load_config(None, [*base, f"method={m}"]) for m in ("natural", "pgd_at", "sprout")}
    rows = comparison_rows(_FakeClient(), {m: f"run-{m}" for m in cfgs}, {m: _FakeResult(0.9) for m in cfgs}, cfgs)
    by = {r["method"]: r for r in rows}
    assert {m: (r["augment"], r["selected_by"]) for m, r in by.items()} == {
        "natural": ("standard", "val/clean_acc"), "pgd_at": ("standard", "val/pgd_acc"),
        "sprout": ("standard", "val/pgd_acc")}
    table = format_table(rows)
    header = table.splitlines()[0]
    assert "augment" in header and "selected_by" in header
    assert "| natural | standard | val/clean_acc |" in table


def test_transfer_without_a_source_is_a_config_error_never_a_silent_drop():
    from orchestrator.evaluate import evaluate_states, resolve_transfer_source

    cfg = load_config(DIGITS, ["eval.attacks=[pgd20,transfer]"])
    with pytest.raises(ConfigError, match="eval.transfer_source"):
        evaluate_states(cfg, {}, attacks=["pgd20", "transfer"])  # raised before any Ray task
    with pytest.raises(ConfigError, match="eval.transfer_source"):
        resolve_transfer_source(cfg)


def test_transfer_source_may_be_a_checkpoint_path(tmp_path):
    from orchestrator.evaluate import resolve_transfer_source
    from orchestrator.worker import build_model, data_info
    from trainables.checkpoint import save_checkpoint

    cfg = load_config(DIGITS, ["method=natural"])
    model = build_model(cfg, data_info(cfg))
    save_checkpoint(tmp_path / "natural", {"model": model.state_dict(), "epoch": 0})
    target = load_config(DIGITS, [f"eval.transfer_source={tmp_path / 'natural'}"])
    src_cfg, state = resolve_transfer_source(target)
    assert src_cfg.model.name == target.model.name
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
