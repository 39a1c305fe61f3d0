"""``sprout sweep`` on a real local Ray + MLflow: ASHA, resume after Ctrl-C and after a killed driver (issue 5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from orchestrator import tracking
from orchestrator.sweep import max_concurrent
from search_spaces import SPACES, SearchSpaceError, load_space
from search_spaces.registry import check_keys
from tests.conftest import DIGITS, digits_cfg
from tests.orchestrator.test_reliability import (
    _children,
    _latest_ckpt_epoch,
    _reap_group,
    _record_pid,
    _steps,
    _stop_with,
    _wait_until,
)

SWEEP_SETS = ["train.epochs=4", "tune.max_concurrent_trials=2", "tune.scheduler=asha", "tune.grace_period=1",
              "tune.reduction_factor=2", "eval.attacks=[]", "train.checkpoint_keep=10", "experiment=test-sweep"]


@pytest.mark.parametrize("name", list(SPACES))
def test_every_space_uses_only_config_fields(name) -> None:
    space = load_space(name)
    assert space and all(isinstance(k, str) for k in space)


def _domain(v):
    """A search-space entry as plain data: grid values, choices, or (sampler, lower, upper)."""
    if isinstance(v, (str, int, float)):
        return v
    if isinstance(v, dict) and "grid_search" in v:
        return ("grid", list(v["grid_search"]))
    if hasattr(v, "categories"):
        return ("choice", list(v.categories))
    if hasattr(v, "lower"):
        return (type(v.get_sampler()).__name__.lstrip("_"), v.lower, v.upper)
    return v


def test_the_spaces_hold_the_papers_values() -> None:
    """What each named space sweeps (paper Fig. 5 for the sensitivity grid), literally."""
    got = {name: {k: _domain(v) for k, v in load_space(name).items()} for name in SPACES}
    assert got["sensitivity"] == {"method": "sprout", "sprout.dirichlet_alpha": ("grid", [0.001, 0.01, 0.1]),
                                  "sprout.mixup_alpha": ("grid", [0.1, 0.2, 0.5]),
                                  "sprout.gaussian_delta": ("grid", [0.1])}
    assert got["baselines"] == {"method": ("grid", ["pgd_at", "trades"]), "pgd_at.steps": ("choice", [3, 7, 10]),
                                "trades.beta": ("choice", [1.0, 6.0])}
    assert got["sprout_random"] == {"method": "sprout", "sprout.dirichlet_alpha": ("LogUniform", 1e-3, 0.3),
                                    "sprout.mixup_alpha": ("LogUniform", 0.05, 2.0),
                                    "sprout.gaussian_delta": ("LogUniform", 0.01, 0.3)}


@pytest.mark.parametrize("name", list(SPACES))
def test_every_value_of_every_space_is_a_valid_config(name) -> None:
    """Each grid value, choice and range end passes the config's own validation (a trial would
    otherwise fail only when Tune reaches it)."""
    import itertools

    from orchestrator.config import load_config

    options = []
    for k, v in load_space(name).items():
        d = _domain(v)
        values = d[1] if isinstance(d, tuple) and d[0] in ("grid", "choice") else list(d[1:]) if isinstance(d, tuple) else [d]
        options.append([f"{k}={x}" for x in values])
    for combo in itertools.product(*options):
        load_config(DIGITS, list(combo))


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


def _records(debug) -> dict[str, tuple[int, int]]:
    """file name → (pid, mtime) of every per-epoch worker record of one trial."""
    return {p.name: (json.loads(p.read_text())["pid"], p.stat().st_mtime_ns) for p in debug.glob("worker-*-epoch-*.json")}


def _kept_pids(debug, rr, kids) -> dict[str, dict[int, int]]:
    """Per trial run: the pid that trained each epoch up to the checkpoint Ray would resume from."""
    return {k.info.run_name: {e: _record_pid(debug / k.info.run_name, e)
                              for e in range(_latest_ckpt_epoch(rr / k.info.run_name))} for k in kids}


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_ctrl_c_then_killed_driver_then_rerun_resumes_every_trial(tmp_path, mlflow_uri) -> None:
    """``sprout sweep`` (4 trials of 4 epochs, 2 at a time, ASHA) stopped twice, then finished.

    1. Ctrl-C (SIGINT to the process group, as a terminal sends it) while the running trials are
       held at the start of epoch 2 (the job-wide drill hook): exit 130, parent and started
       trials ``KILLED``. Ray Tune alone would swallow the first Ctrl-C and return as if done
       (parent FINISHED, exit 0); SIGTERM takes the same ``fit_tuner`` path (the compare test
       sends it to a Tune phase for real).
    2. The same command, ``SIGKILL``ed (process group) once one more trial has finished.
    3. The same command again: it finishes, and nothing checkpointed before either stop, nor the
       finished trial, was trained again (per-epoch worker pid records).
    Each run is a real ``sprout sweep`` process with its own local Ray; the test process holds
    no Ray instance meanwhile (one instance at a time, as on a laptop).
    """
    import csv

    import ray

    ray.shutdown()
    rr, debug = tmp_path / "rr", tmp_path / "debug"
    sets = [*SWEEP_SETS, f"storage.path={rr}", "train.val_pgd_steps=2"]
    cmd = [sys.executable, "-m", "orchestrator", "sweep", str(DIGITS), "--space", "sensitivity_small",
           "--name", "sweep-kill", *[a for s in sets for a in ("--set", s)]]
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri, SPROUT_DEBUG_DIR=str(debug))
    env.pop("RAY_ADDRESS", None)
    c = tracking.client(mlflow_uri)
    debug.mkdir()
    (debug / "pause-at-epoch").write_text("1")  # every trial holds once, after its first checkpoint

    # 1. Ctrl-C once a trial is held with its first epoch checkpointed
    def held() -> bool:
        _, kids = _children(c, "test-sweep", "sweep-kill")
        return any((debug / k.info.run_name / "paused-at-epoch-1").exists()
                   and _latest_ckpt_epoch(rr / k.info.run_name) >= 1 for k in kids)

    err_path = tmp_path / "int.err"
    code = _stop_with(signal.SIGINT, True, cmd, env, tmp_path, err_path, held)
    stderr = err_path.read_text()
    assert code == 130, stderr[-3000:]
    assert "re-run the same command to resume" in stderr
    parent, kids = _children(c, "test-sweep", "sweep-kill")
    assert parent.info.status == "KILLED"
    assert kids and {k.info.status for k in kids} <= {"KILLED", "FINISHED"}, [k.info.status for k in kids]
    assert "KILLED" in {k.info.status for k in kids}  # the held trial, at least
    assert not any(tracking.ERROR_TAG in k.data.tags for k in kids)
    for k in kids:
        steps = _steps(c, k.info.run_id, "train/loss")
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= _latest_ckpt_epoch(rr / k.info.run_name)
    kept = {"Ctrl-C": _kept_pids(debug, rr, kids)}
    assert sum(len(v) for v in kept["Ctrl-C"].values()) >= 1
    finished_before = {k.info.run_id for k in kids if k.info.status == "FINISHED"}

    # 2. the re-run, SIGKILLed as soon as one more trial has finished
    newly_finished: list = []

    def one_more_finished() -> bool:
        _, now = _children(c, "test-sweep", "sweep-kill")
        newly_finished[:] = [k for k in now if k.info.status == "FINISHED" and k.info.run_id not in finished_before]
        return bool(newly_finished)

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=tmp_path)
    try:
        _wait_until(proc, one_more_finished, "one more trial finished")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        _reap_group(proc.pid)
    done = newly_finished[0]
    done_key = done.data.tags["sprout.run_key"]
    done_steps = _steps(c, done.info.run_id, "train/loss")
    done_records = _records(debug / done.info.run_name)
    # (a trial ASHA stops has begun its next epoch, and recorded it, when the stop reaches it)
    assert {f"worker-0-epoch-{e}.json" for e in range(len(done_steps))} <= set(done_records), done_records
    _, kids = _children(c, "test-sweep", "sweep-kill")
    kept["SIGKILL"] = _kept_pids(debug, rr, kids)

    # 3. the re-run that finishes (no hold: a trial that never started must not wait)
    (debug / "pause-at-epoch").unlink()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=1200)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    exp = c.get_experiment_by_name("test-sweep")
    parents = c.search_runs([exp.experiment_id], filter_string="tags.`sprout.run_key` = 'sweep-kill'")
    assert len(parents) == 1 and parents[0].data.tags["sprout_kind"] == "sweep"
    assert parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    children = c.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    keys = [r.data.tags["sprout.run_key"] for r in children]
    assert len(keys) == 4 and len(set(keys)) == 4, keys  # one child per trial, none duplicated
    swept = {(r.data.params["sprout.dirichlet_alpha"], r.data.params["sprout.mixup_alpha"]) for r in children}
    assert swept == {("0.01", "0.2"), ("0.01", "1.0"), ("0.1", "0.2"), ("0.1", "1.0")}
    # the trial that had finished before the kill was not trained again
    again = next(r for r in children if r.data.tags["sprout.run_key"] == done_key)
    assert _steps(c, again.info.run_id, "train/loss") == done_steps
    assert _records(debug / again.info.run_name) == done_records, "the finished trial was trained again"
    # epochs checkpointed before each stop kept the process that trained them: resumed, not redone
    for stop, by_trial in kept.items():
        for run_name, by_epoch in by_trial.items():
            for e, pid in by_epoch.items():
                rec = json.loads((debug / run_name / f"worker-0-epoch-{e}.json").read_text())
                assert rec["pid"] == pid, f"{run_name}: epoch {e + 1}, checkpointed before the {stop}, was trained again"
    assert all(r.info.status == "FINISHED" for r in children), [r.info.status for r in children]
    table = c.download_artifacts(parent, "report/sweep_results.csv", str(tmp_path))
    rows = list(csv.DictReader(open(table)))
    assert len(rows) == 4
    iters = {r["trial_id"]: int(float(r["epoch"] or 0)) for r in rows}
    # Which rung stopped a trial is not read from a real run: ASHA's STOP reaches the trial
    # after its next report or two (digits' epochs are sub-second), so Tune's last result can be
    # a rung's epoch plus one (seen: epoch 3 after a rung-2 stop). The rung rule itself (by
    # epoch, never the best at a rung, never at the last epoch) is the unit test below.
    assert set(iters.values()) <= {1, 2, 3, 4} and 4 in iters.values(), iters
    by_trial = {r.data.tags["sprout.run_key"].split("/", 1)[1]: r for r in children}
    assert sorted(by_trial) == sorted(iters)
    for trial, it in iters.items():
        run = by_trial[trial]
        # rank 0 logs each epoch before Tune hears of it: a stopped trial may have logged up to
        # its last epoch, never a gap or a duplicate
        steps = _steps(c, run.info.run_id, "train/loss")
        assert steps == list(range(1, len(steps) + 1)) and it <= len(steps) <= 4, (trial, it, steps)
        assert (run.data.tags.get("sprout.early_stopped") == "true") == (it < 4), (trial, it)
    # a trial ASHA stopped is not a failure: no error recorded on its run
    assert not any(tracking.ERROR_TAG in r.data.tags for r in children)
    # The first trial at each rung is never stopped, so one trial trains all 4 epochs and ends
    # itself (Tune's STOP at max_t used to kill it first): its final model, total time and
    # selected checkpoint are logged.
    full = [c.get_run(by_trial[t].info.run_id) for t, it in iters.items() if it == 4]
    assert any(r.data.tags.get("sprout.model_logged") == "true" and "time/train_total_s" in r.data.metrics
               and "sprout.selected_checkpoint" in r.data.tags for r in full), [r.data.tags for r in full]
    plots = {a.path for a in c.list_artifacts(parent, "plots")}
    assert any("sensitivity" in p for p in plots)
    assert "best.sprout.dirichlet_alpha" in c.get_run(parent).data.params


METRIC = "val/pgd_acc"  # tune.metric of configs/digits.yaml (SPROUT selects by it)


def test_asha_stops_below_the_median_at_a_rung_by_epoch_but_never_a_trial_at_its_last_epoch() -> None:
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from orchestrator.asha import EpochASHA

    s = EpochASHA(epochs=4, grace_period=1, reduction_factor=2)
    assert s.set_search_properties(METRIC, "max")
    a, b, resumed, free_at = (SimpleNamespace(trial_id=t) for t in ("a", "b", "resumed", "free_at"))
    for t in (a, b, resumed, free_at):
        s.on_trial_add(None, t)

    def result(epoch: int, acc: float, iteration: int | None = None, epochs: int = 4) -> dict:
        return {"epoch": epoch, METRIC: acc, "training_iteration": iteration or epoch, "epochs": epochs}

    assert s.on_trial_result(None, a, result(1, 0.9)) == TrialScheduler.CONTINUE  # first at rung 1
    assert s.on_trial_result(None, b, result(1, 0.1)) == TrialScheduler.STOP  # below the median there
    assert s.on_trial_result(None, a, result(2, 0.9)) == TrialScheduler.CONTINUE
    # a trial resumed after a killed driver: its first result since the restart is Tune's
    # iteration 1, but it is epoch 2 and is judged at rung 2 (below 0.9: stopped; at rung 1
    # it would be above the median of 0.9 and 0.1, and go on)
    assert s.on_trial_result(None, resumed, result(2, 0.6, iteration=1)) == TrialScheduler.STOP
    # the last epoch (max_t) ends the trial itself: Tune's STOP there would kill it before it
    # logs its final model
    assert s.on_trial_result(None, a, result(4, 0.9)) == TrialScheduler.CONTINUE
    # so does a trial's own last epoch before max_t: Free-AT with 2 replays trains 2 of the 4
    # epochs, and is below the median at rung 2 (0.9 and 0.6 there)
    assert s.on_trial_result(None, free_at, result(1, 0.95, epochs=2)) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, free_at, result(2, 0.1, epochs=2)) == TrialScheduler.CONTINUE


def test_asha_scheduler_is_built_from_the_tune_section(tmp_path) -> None:
    from ray.tune.schedulers import AsyncHyperBandScheduler

    from orchestrator.sweep import make_tuner

    cfg = digits_cfg(tmp_path, *SWEEP_SETS)
    assert cfg.tune.metric == METRIC
    tuner = make_tuner(cfg, "asha-unit", {}, samples=1, scheduler="asha", search="random", parent_run_id="p",
                       concurrency=2)
    tc = tuner._local_tuner._tune_config
    assert isinstance(tc.scheduler, AsyncHyperBandScheduler)
    assert [m for m, _ in tc.scheduler._brackets[0]._rungs] == [4, 2, 1]  # rungs at epochs 1, 2 and 4
    assert tc.scheduler._time_attr == "epoch"  # the trained epoch: Tune's result count restarts on resume
    assert (tc.metric, tc.mode, tc.max_concurrent_trials) == (METRIC, "max", 2)
    fifo = make_tuner(cfg, "fifo-unit", {}, samples=1, scheduler="fifo", search="random", parent_run_id="p",
                      concurrency=1)
    assert fifo._local_tuner._tune_config.scheduler is None


@pytest.mark.ray
@pytest.mark.slow
def test_optuna_search_samples_the_log_uniform_space_into_child_runs(tmp_path, ray_local, session_dir) -> None:
    """``--search optuna``: Optuna's TPE proposes each trial's α, a and Δ within the space's bounds.
    Each trial is itself a 2-worker Ray Train run (``scaling.num_workers=2`` inside a sweep)."""
    from orchestrator.sweep import run_sweep

    cfg = digits_cfg(tmp_path, "train.epochs=1", "experiment=test-sweep-optuna", "train.val_pgd_steps=2",
                     "tune.max_concurrent_trials=1", "scaling.num_workers=2")
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
    for k in kids:  # two workers trained each trial, on disjoint halves of the training set
        assert k.data.params["scaling.num_workers"] == "2"
        debug = session_dir / "debug" / k.info.run_name
        seen = [json.loads((debug / f"worker-{r}-epoch-0.json").read_text()) for r in (0, 1)]
        assert seen[0]["pid"] != seen[1]["pid"]
        assert set(seen[0]["indices"]).isdisjoint(seen[1]["indices"]) and len(seen[0]["indices"]) == len(seen[1]["indices"]) > 0
