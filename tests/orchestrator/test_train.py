"""Ray Train runs on a real local Ray with a real MLflow store (SPEC §5, issue 3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator import tracking
from orchestrator.runner import run_training
from tests.conftest import ROOT, digits_cfg

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


def _records(debug: Path) -> dict[tuple[int, int], dict]:
    """(rank, epoch) → the worker's record of that epoch (pid, node_id, indices), with the file's mtime."""
    out = {}
    for p in debug.glob("worker-*-epoch-*.json"):
        _, rank, _, epoch = p.stem.split("-")
        out[int(rank), int(epoch)] = {**json.loads(p.read_text()), "mtime_ns": p.stat().st_mtime_ns}
    return out


def run_config(run_id: str, uri: str | None = None):
    """The config a run trained with, from its ``config.yaml`` artifact (in the store at ``uri``)."""
    import tempfile

    from orchestrator.config import from_dict

    with tempfile.TemporaryDirectory() as d:
        path = tracking.client(uri).download_artifacts(run_id, "config.yaml", d)
        return from_dict(yaml.safe_load(Path(path).read_text()))


def recompute(cfg, checkpoint: str, attacks: list[str], n_examples: int) -> dict[str, float]:
    """The suite on ``checkpoint`` in this process (one shard, no Ray): what a logged number must equal."""
    from orchestrator.evaluate import eval_config, load_model
    from orchestrator.storage import load_checkpoint
    from orchestrator.worker import datasets
    from trainables.evaluation import run_suite

    model = load_model(cfg, load_checkpoint(checkpoint)["model"])
    test = datasets(cfg, ("test",))["test"]
    res = run_suite(model, test, attacks, eval_config(cfg, attacks, n_examples), device="cpu")
    return res.accuracies()


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory, mlflow_uri, session_dir):
    """One 2-worker SPROUT run on digits, shared by the tests below (Ray start-up is costly)."""
    import ray

    from orchestrator.session import ensure_ray

    os.environ["SPROUT_DEBUG_DIR"] = str(session_dir / "debug")
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_uri
    # the git_sha tag must come from the checkout itself (SPROUT_GIT_SHA overrides it on clusters)
    sha_env = os.environ.pop("SPROUT_GIT_SHA", None)
    ensure_ray()
    tmp = tmp_path_factory.mktemp("two")
    cfg = digits_cfg(tmp, "scaling.num_workers=2", "experiment=test-two-workers", "train.epochs=3")
    try:
        out = run_training(cfg, "two-workers")
    finally:
        if sha_env is not None:
            os.environ["SPROUT_GIT_SHA"] = sha_env
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
    # the last report to Ray carried the trained epoch and the run's own epoch count (what ASHA
    # reads to never stop a trial at its last epoch); neither is an MLflow metric
    assert (out.metrics["epoch"], out.metrics["epochs"]) == (3, 3)
    assert not {"epoch", "epochs"} & set(run.data.metrics)
    tags = run.data.tags
    assert tags["method"] == "sprout" and tags["model"] == "small_cnn" and tags["dataset"] == "digits"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert tags["sprout_kind"] == "train" and tags["git_sha"] == head.stdout.strip()
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

    cfg, out, _ = two_worker_run
    # the exported (pt2) module, as users load it; it is in eval mode already (and refuses .eval())
    model = mlflow.pytorch.load_model(f"runs:/{out.run_id}/model")
    selected = tracking.client().get_run(out.run_id).data.tags["sprout.selected_checkpoint"]
    epoch = load_checkpoint(selected)["epoch"] + 1
    logged = {m.step: m.value for m in tracking.client().get_metric_history(out.run_id, "val/clean_acc")}[epoch]
    x, y = datasets(cfg, ("val",))["val"].tensors()
    with torch.no_grad():
        correct = int((torch.cat([model(x[i:i + 256]) for i in range(0, len(y), 256)]).argmax(1) == y).sum())
    assert correct / len(y) == pytest.approx(logged, abs=1e-9)
    assert model(x[:4]).shape == (4, 10)  # takes [0,1] images, returns logits


def test_selected_checkpoint_is_the_argmax_of_the_selection_metric(two_worker_run) -> None:
    """SPROUT selects by val/pgd_acc: the selected checkpoint is an epoch where it is highest."""
    from trainables.checkpoint import load_checkpoint

    cfg, out, _ = two_worker_run
    c = tracking.client()
    hist = {m.step: m.value for m in c.get_metric_history(out.run_id, "val/pgd_acc")}
    assert sorted(hist) == [1, 2, 3]
    assert len(set(hist.values())) > 1, f"no epoch is better than another; the test shows nothing: {hist}"
    epoch = load_checkpoint(out.best_checkpoint_path)["epoch"] + 1
    assert hist[epoch] == max(hist.values()), (epoch, hist)
    assert c.get_run(out.run_id).data.tags["sprout.selected_checkpoint"] == out.best_checkpoint_path


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
    cfg, first, debug = two_worker_run
    before = _records(debug)
    assert sorted(before) == [(r, e) for r in (0, 1) for e in range(3)]
    again = run_training(cfg, "two-workers")
    assert _records(debug) == before, "a finished run trained epochs again on re-run"
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
    killed = int((debug / "killed-at-epoch-2").read_text())
    recs = _records(debug)
    assert sorted(recs) == [(r, e) for r in (0, 1) for e in range(3)]
    by_killed = [e for e in range(3) if recs[0, e]["pid"] == killed]
    # Resumed, not retrained: the drill kills only once the controller has registered the worker's
    # last reported checkpoint (epoch 2's; without that wait the kill usually beats the controller's
    # poll and the restart goes back to epoch 1), so epochs 1-2 keep the killed worker's records
    # and the restart trained only epoch 3.
    assert by_killed == [0, 1], by_killed
    first_new = len(by_killed)
    assert (debug / f"worker-0-epoch-{first_new}.json").exists()
    new_pids = {recs[r, e]["pid"] for r in (0, 1) for e in range(first_new, 3)}
    old_pids = {recs[r, e]["pid"] for r in (0, 1) for e in range(first_new)}
    assert killed not in new_pids and not new_pids & old_pids, (recs, first_new)
    c = tracking.client()
    assert len(_runs_with_key(c, cfg.experiment, "killed")) == 1
    assert _steps(c, out.run_id, "train/loss") == [1, 2, 3]
    a, b = _final_state(reference.checkpoint_path), _final_state(out.checkpoint_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


@pytest.mark.parametrize(("epochs", "every", "due"), [(3, 1, [0, 1, 2]), (10, 4, [3, 7, 9]), (4, 2, [1, 3]),
                                                    (2, 5, [1])])
def test_checkpoint_due_every_nth_epoch_and_always_the_last(epochs, every, due) -> None:
    from orchestrator.ray_train import checkpoint_due

    assert [e for e in range(epochs) if checkpoint_due(e, epochs, every)] == due


def test_a_drill_file_read_while_it_is_rewritten_in_place_waits_for_its_number(tmp_path) -> None:
    """A test's ``write_text`` truncates before it writes: a worker polling ``pause-at-epoch`` can
    read ``''`` (CI, stop 29: the run failed with ``invalid literal for int()``); the hook reads again."""
    from orchestrator.ray_train import _epoch_in

    drill = tmp_path / "pause-at-epoch"
    drill.write_text("")
    writer = threading.Timer(0.2, lambda: drill.write_text("3"))
    writer.start()
    try:
        assert _epoch_in(drill) == 3
    finally:
        writer.join()
    drill.write_text("")
    with pytest.raises(ValueError, match="pause-at-epoch stayed empty; it must hold an epoch number"):
        _epoch_in(drill, tries=3)


def test_checkpoint_every_two_epochs_and_a_killed_worker_resumes_from_the_last_one(two_worker_run, session_dir) -> None:
    """``train.checkpoint_every=2`` over 5 epochs: checkpoints after epochs 2, 4 and 5 only. Rank 0
    SIGKILLs itself at the start of epoch 4, after epoch 3 trained without a checkpoint: Ray restarts
    from epoch 2's checkpoint, so epoch 3 is trained again by the new process (and logged once)."""
    from trainables.checkpoint import load_checkpoint

    cfg0, _, _ = two_worker_run
    name = "every-two"
    debug = session_dir / "debug" / name
    debug.mkdir(parents=True, exist_ok=True)
    (debug / "kill-at-epoch").write_text("3")
    cfg = digits_cfg(Path(cfg0.storage.path).parent, "experiment=test-checkpoint-every", "train.epochs=5",
                     "train.checkpoint_every=2", "train.max_failures=1")
    out = run_training(cfg, name)
    killed = int((debug / "killed-at-epoch-3").read_text())
    pids = {e: rec["pid"] for (r, e), rec in _records(debug).items() if r == 0}
    assert [pids[e] == killed for e in range(5)] == [True, True, False, False, False], (killed, pids)
    ckpts = sorted(d for d in (Path(cfg.storage.path) / name).glob("checkpoint_*") if d.is_dir())
    assert sorted(load_checkpoint(d)["epoch"] for d in ckpts) == [1, 3, 4]
    c = tracking.client()
    for key in PER_EPOCH:
        assert _steps(c, out.run_id, key) == [1, 2, 3, 4, 5], key
    # the selected model is the best of the checkpointed epochs
    hist = {m.step: m.value for m in c.get_metric_history(out.run_id, "val/pgd_acc")}
    epoch = load_checkpoint(out.best_checkpoint_path)["epoch"] + 1
    assert epoch in (2, 4, 5) and hist[epoch] == max(hist[e] for e in (2, 4, 5)), (epoch, hist)


def test_sprout_eval_run_id_logs_test_metrics_to_the_training_run(two_worker_run, capsys, tmp_path) -> None:
    from orchestrator.cli import main

    cfg, out, _ = two_worker_run
    code = main(["eval", "--run-id", out.run_id, "--attacks", "pgd20,invariance", "--n-examples", "60"])
    assert code == 0
    m = tracking.client().get_run(out.run_id).data.metrics
    for k in ("test/clean_acc", "test/pgd20_acc", "test/rotation_acc", "test/gray_acc"):
        assert 0.0 <= m[k] <= 1.0, k
    # the numbers are those of the run's own selected checkpoint, not of another model
    want = recompute(run_config(out.run_id), out.best_checkpoint_path, ["pgd20", "invariance"], 60)
    for k in ("test/clean_acc", "test/pgd20_acc", "test/rotation_acc", "test/gray_acc"):
        assert m[k] == want[k], (k, m[k], want[k])
    assert "pgd20" in capsys.readouterr().out

    # `sprout eval CHECKPOINT --config C`: a new run (kind eval) with the same numbers, plus the
    # accuracy-vs-ε figure of eval.eps_curve
    conf = tmp_path / "trained.yaml"
    conf.write_text(yaml.safe_dump(cfg.to_dict()))
    code = main(["eval", out.best_checkpoint_path, "--config", str(conf), "--attacks", "pgd20", "--n-examples", "60",
                 "--set", "eval.eps_curve=[0.05,0.2]"])
    assert code == 0
    capsys.readouterr()
    c = tracking.client()
    exp = c.get_experiment_by_name(cfg.experiment).experiment_id
    (run,) = c.search_runs([exp], filter_string="tags.`sprout_kind` = 'eval'")
    new_id = run.info.run_id
    assert new_id != out.run_id and run.info.status == "FINISHED"
    assert run.data.tags["sprout_kind"] == "eval"
    assert run.data.tags["sprout.selected_checkpoint"] == out.best_checkpoint_path
    got = run.data.metrics
    assert got["test/clean_acc"] == m["test/clean_acc"] and got["test/pgd20_acc"] == m["test/pgd20_acc"]
    assert {"test/pgd20_acc_eps0.05", "test/pgd20_acc_eps0.2"} <= set(got), sorted(got)
    plots = {a.path for a in c.list_artifacts(new_id, "plots")}
    assert "plots/accuracy_vs_eps.png" in plots, plots
    assert "plots/accuracy_vs_eps.png" not in {a.path for a in c.list_artifacts(out.run_id, "plots")}


def test_sprout_eval_exit_codes_2_for_usage_and_1_for_a_failed_evaluation(two_worker_run, capsys, tmp_path) -> None:
    from orchestrator.cli import main

    cfg, out, _ = two_worker_run
    conf = tmp_path / "trained.yaml"
    conf.write_text(yaml.safe_dump(cfg.to_dict()))
    c = tracking.client()
    exp = c.get_experiment_by_name(cfg.experiment).experiment_id
    n_runs = len(c.search_runs([exp]))
    for argv, needle in [
        (["eval"], "exactly one of CHECKPOINT"),
        (["eval", out.best_checkpoint_path], "needs --config"),
        (["eval", "--run-id", "0" * 32], "no such MLflow run"),
        (["eval", "--run-id", out.run_id, "--attacks", "pgd7"], "unknown attack 'pgd7'"),
        (["eval", "--run-id", out.run_id, "--n-examples", "0"], "--n-examples"),
    ]:
        assert main(argv) == 2, argv
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("sprout: config error: ") and needle in err[0], (argv, err)
    # a checkpoint that fails its checksum: the evaluation fails (exit 1), naming the file
    bad = tmp_path / "tampered"
    shutil.copytree(out.best_checkpoint_path, bad)
    f = next(p for p in bad.iterdir() if p.is_file())
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    assert main(["eval", str(bad), "--config", str(conf), "--attacks", "pgd20", "--n-examples", "8"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("sprout: eval failed: CheckpointError") and str(bad) in err[0], err
    assert len(c.search_runs([exp])) == n_runs  # no run was created for the failed evaluation


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
