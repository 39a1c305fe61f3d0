"""``sprout sweep`` on a real local Ray + MLflow: ASHA, resume after a killed driver (issue 5)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from orchestrator import tracking
from orchestrator.sweep import max_concurrent
from search_spaces import SPACES, SearchSpaceError, load_space
from search_spaces.registry import check_keys
from tests.conftest import DIGITS, digits_cfg

SWEEP_SETS = ["train.epochs=4", "tune.max_concurrent_trials=2", "tune.scheduler=asha", "tune.grace_period=1",
              "tune.reduction_factor=2", "eval.attacks=[]", "train.checkpoint_keep=10", "experiment=test-sweep"]


@pytest.mark.parametrize("name", list(SPACES))
def test_every_space_uses_only_config_fields(name) -> None:
    space = load_space(name)
    assert space and all(isinstance(k, str) for k in space)


def test_space_keys_that_are_not_config_fields_are_rejected() -> None:
    with pytest.raises(SearchSpaceError, match="'sprout.alpha' is not a config field"):
        check_keys("typo", {"sprout.alpha": 0.1})
    with pytest.raises(SearchSpaceError, match="'optimizer.lr' is not a config field"):
        check_keys("typo", {"optimizer.lr": 0.1})
    with pytest.raises(SearchSpaceError, match="unknown search space 'nope'"):
        load_space("nope")


def test_concurrency_is_derived_from_resources(tmp_path) -> None:
    cfg = digits_cfg(tmp_path, "scaling.num_workers=2", "scaling.cpus_per_worker=0.5")
    assert max_concurrent(cfg, None, {"CPU": 2.0, "GPU": 0.0}) == 1  # 2 × 0.5 + 0.01 per trial
    assert max_concurrent(cfg, None, {"CPU": 8.0, "GPU": 0.0}) == 7
    assert max_concurrent(cfg, 3, {"CPU": 8.0, "GPU": 0.0}) == 3
    gpu = digits_cfg(tmp_path, "scaling.use_gpu=true", "scaling.num_workers=2")
    assert max_concurrent(gpu, None, {"CPU": 64.0, "GPU": 4.0}) == 2


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_asha_resume_after_killed_driver(tmp_path, mlflow_uri) -> None:
    """4 trials, 2 at a time, ASHA; the driver is SIGKILLed mid-way and the sweep re-run.

    Both halves run as real ``sprout sweep`` processes, each with its own local Ray; the
    test process holds no Ray instance meanwhile (one instance at a time, as on a laptop).
    """
    import csv

    import ray

    ray.shutdown()
    sets = [*SWEEP_SETS, f"storage.path={tmp_path / 'rr'}"]
    cmd = [sys.executable, "-m", "orchestrator", "sweep", str(DIGITS), "--space", "sensitivity_small",
           "--name", "sweep-kill", *[a for s in sets for a in ("--set", s)]]
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=tmp_path)
    c = tracking.client(mlflow_uri)
    deadline = time.time() + 600
    finished: list = []
    try:
        while not finished:
            assert proc.poll() is None, "the sweep ended before it could be interrupted"
            if not (time.time() < deadline):
                pytest.fail("no trial finished in time")
            exp = c.get_experiment_by_name("test-sweep")
            if exp is not None:
                finished = c.search_runs([exp.experiment_id], filter_string=(
                    "tags.`sprout.run_key` LIKE 'sweep-kill/%' and attributes.status = 'FINISHED'"))
            time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    done_key = finished[0].data.tags["sprout.run_key"]
    done_steps = [m.step for m in c.get_metric_history(finished[0].info.run_id, "train/loss")]

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    exp = c.get_experiment_by_name("test-sweep")
    parents = c.search_runs([exp.experiment_id], filter_string="tags.`sprout.run_key` = 'sweep-kill'")
    assert len(parents) == 1 and parents[0].data.tags["sprout_kind"] == "sweep"
    parent = parents[0].info.run_id
    children = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    keys = [r.data.tags["sprout.run_key"] for r in children]
    assert len(keys) == 4 and len(set(keys)) == 4, keys  # one child per trial, none duplicated
    swept = {(r.data.params["sprout.dirichlet_alpha"], r.data.params["sprout.mixup_alpha"]) for r in children}
    assert swept == {("0.01", "0.2"), ("0.01", "1.0"), ("0.1", "0.2"), ("0.1", "1.0")}
    # the trial that had finished before the kill was not trained again
    again = next(r for r in children if r.data.tags["sprout.run_key"] == done_key)
    assert [m.step for m in c.get_metric_history(again.info.run_id, "train/loss")] == done_steps
    assert all(r.info.status == "FINISHED" for r in children)
    table = c.download_artifacts(parent, "report/sweep_results.csv", str(tmp_path))
    rows = list(csv.DictReader(open(table)))
    assert len(rows) == 4
    iters = [int(float(r["training_iteration"] or 0)) for r in rows]
    assert min(iters) < 4 == max(iters), f"ASHA stopped no trial early: {iters}"
    early = [r for r in children if r.data.tags.get("sprout.early_stopped") == "true"]
    assert len(early) == sum(i < 4 for i in iters)
    # a trial ASHA stopped is not a failure: no error recorded on its run
    assert not any(tracking.ERROR_TAG in r.data.tags for r in children)
    plots = {a.path for a in c.list_artifacts(parent, "plots")}
    assert any("sensitivity" in p for p in plots)
    assert "best.sprout.dirichlet_alpha" in c.get_run(parent).data.params


@pytest.mark.ray
@pytest.mark.slow
def test_optuna_search_samples_the_log_uniform_space_into_child_runs(tmp_path, ray_local) -> None:
    """``--search optuna``: Optuna's TPE proposes each trial's α, a and Δ within the space's bounds."""
    from orchestrator.sweep import run_sweep

    cfg = digits_cfg(tmp_path, "train.epochs=1", "experiment=test-sweep-optuna", "train.val_pgd_steps=2",
                     "tune.max_concurrent_trials=1")
    out = run_sweep(cfg, "sprout_random", name="optuna-2", samples=2, scheduler="fifo", search="optuna",
                    log_model=False)
    c = tracking.client()
    parent = c.get_run(out["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.search"] == "optuna"
    exp = c.get_experiment_by_name("test-sweep-optuna")
    kids = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    bounds = {"sprout.dirichlet_alpha": (1e-3, 0.3), "sprout.mixup_alpha": (0.05, 2.0),
              "sprout.gaussian_delta": (0.01, 0.3)}
    for key, (lo, hi) in bounds.items():
        values = [float(k.data.params[key]) for k in kids]
        assert all(lo <= v <= hi for v in values) and len(set(values)) == 2, (key, values)
    assert {r["sprout.dirichlet_alpha"] for r in out["rows"]} == {
        float(k.data.params["sprout.dirichlet_alpha"]) for k in kids}
    assert "best" in out and out["best"]["trial_id"] in {k.data.tags["sprout.run_key"].split("/")[1] for k in kids}
