"""Ray Train runs on a real local Ray with a real MLflow store (SPEC §5, issue 3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator import tracking
from orchestrator.runner import run_training
from tests.conftest import digits_cfg

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PER_EPOCH = ["train/loss", "train/acc", "val/clean_acc", "val/pgd_acc", "time/epoch_s", "time/samples_per_s",
             "sprout/beta_entropy"]


def _steps(c, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def _runs_with_key(c, experiment: str, key: str) -> list:
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.RUN_KEY}` = '{key}'")


def _final_state(path: str) -> dict[str, torch.Tensor]:
    from trainables.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, mlflow_uri, session_dir):
    """One 2-worker SPROUT run on digits, shared by the tests below (Ray start-up is costly)."""
    import ray

    from orchestrator.session import ensure_ray

    os.environ["SPROUT_DEBUG_DIR"] = str(session_dir / "debug")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    ensure_ray()
    tmp = tmp_path_factory.mktemp("two")
    cfg = digits_cfg(tmp, "scaling.num_workers=2", "experiment=test-two-workers", "train.epochs=3")
    out = run_training(cfg, "two-workers")
    assert ray.is_initialized()
    return cfg, out, session_dir / "debug" / "two-workers"


def test_two_workers_log_one_mlflow_run_per_spec(two_worker_run) -> None:
    cfg, out, _ = two_worker_run
    c = tracking.client()
    assert len(_runs_with_key(c, cfg.experiment, "two-workers")) == 1
    run = c.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    for key in PER_EPOCH:
        assert _steps(c, out.run_id, key) == [1, 2, 3], key
    for key in ("time/train_total_s", "time/accelerator_hours"):
        assert run.data.metrics[key] > 0
    tags = run.data.tags
    assert tags["method"] == "sprout" and tags["model"] == "small_cnn" and tags["dataset"] == "digits"
    assert tags["sprout_kind"] == "train" and len(tags["git_sha"]) >= 7
    assert run.data.params["sprout.dirichlet_alpha"] == "0.01"
    assert run.data.params["scaling.num_workers"] == "2"
    for m in c.get_metric_history(out.run_id, "train/acc") + c.get_metric_history(out.run_id, "val/clean_acc"):
        assert 0.0 <= m.value <= 1.0
    d = c.download_artifacts(out.run_id, "config.yaml")
    assert yaml.safe_load(Path(d).read_text()) == cfg.to_dict()


def test_logged_model_loads_and_reproduces_val_accuracy(two_worker_run) -> None:
    import mlflow.pytorch

    from orchestrator.worker import datasets
    from trainables.checkpoint import load_checkpoint
    from trainables.loop import evaluate_counts, make_loader

    cfg, out, _ = two_worker_run
    model = mlflow.pytorch.load_model(f"runs:/{out.run_id}/model")
    selected = tracking.client().get_run(out.run_id).data.tags["sprout.selected_checkpoint"]
    epoch = load_checkpoint(selected)["epoch"] + 1
    logged = {m.step: m.value for m in tracking.client().get_metric_history(out.run_id, "val/clean_acc")}[epoch]
    val = datasets(cfg, ("val",))["val"]
    correct, n = evaluate_counts(model, make_loader(val, 256, seed=0, shuffle=False), torch.device("cpu"))
    assert correct / n == pytest.approx(logged, abs=1e-9)
    x, _ = val.tensors()
    assert model(x[:4]).shape == (4, 10)  # takes [0,1] images, returns logits


def test_workers_trained_on_disjoint_equal_shards(two_worker_run) -> None:
    cfg, _, debug = two_worker_run
    from orchestrator.worker import datasets

    n = len(datasets(cfg, ("train",))["train"])
    for epoch in range(3):
        seen = [set(json.loads((debug / f"worker-{r}-epoch-{epoch}.json").read_text())["indices"]) for r in (0, 1)]
        assert seen[0].isdisjoint(seen[1])
        assert len(seen[0]) == len(seen[1]) == n // 2
        assert seen[0] | seen[1] <= set(range(n))


def test_rerunning_a_finished_name_resumes_without_a_duplicate_run(two_worker_run) -> None:
    cfg, first, _ = two_worker_run
    again = run_training(cfg, "two-workers")
    c = tracking.client()
    assert again.resumed and again.run_id == first.run_id
    assert len(_runs_with_key(c, cfg.experiment, "two-workers")) == 1
    assert _steps(c, first.run_id, "train/loss") == [1, 2, 3]
    a, b = _final_state(first.checkpoint_path), _final_state(again.checkpoint_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_worker_resumes_from_checkpoint_with_identical_weights(two_worker_run, session_dir) -> None:
    """SIGKILL rank 0 at epoch 2 (once): Ray restarts the group from the last checkpoint."""
    cfg, reference, _ = two_worker_run
    debug = session_dir / "debug" / "killed"
    debug.mkdir(parents=True, exist_ok=True)
    (debug / "kill-at-epoch").write_text("2")
    out = run_training(cfg, "killed")
    assert (debug / "killed-at-epoch-2").exists(), "the fault was not injected"
    c = tracking.client()
    assert len(_runs_with_key(c, cfg.experiment, "killed")) == 1
    assert _steps(c, out.run_id, "train/loss") == [1, 2, 3]
    a, b = _final_state(reference.checkpoint_path), _final_state(out.checkpoint_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_sprout_eval_run_id_logs_test_metrics_to_the_training_run(two_worker_run, capsys) -> None:
    from orchestrator.cli import main

    _, out, _ = two_worker_run
    code = main(["eval", "--run-id", out.run_id, "--attacks", "pgd20,invariance", "--n-examples", "60"])
    assert code == 0
    m = tracking.client().get_run(out.run_id).data.metrics
    for k in ("test/clean_acc", "test/pgd20_acc", "test/rotation_acc", "test/gray_acc"):
        assert 0.0 <= m[k] <= 1.0, k
    assert m["test/pgd20_acc"] <= m["test/clean_acc"]
    assert "pgd20" in capsys.readouterr().out


def test_evaluation_sharded_over_two_ray_tasks_equals_one_process(two_worker_run) -> None:
    from orchestrator.evaluate import evaluate_states
    from trainables.checkpoint import load_checkpoint

    cfg, out, _ = two_worker_run
    state = load_checkpoint(out.best_checkpoint_path)["model"]
    attacks = ["pgd20", "cw_linf", "invariance"]
    one = evaluate_states(cfg, state, attacks=attacks, n_examples=90, num_shards=1)
    two = evaluate_states(cfg, state, attacks=attacks, n_examples=90, num_shards=2)
    assert two.counts == one.counts and two.complete
    assert one.counts["test/clean_acc"][1] == 90
