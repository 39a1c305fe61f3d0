"""`sprout` on an autoscaling cluster (issue 11): plans are checked against the autoscaler's
maximum, nodes start on demand, and evaluation runs on the worker nodes.

One real cluster for the module (``tests/autoscaling.py``): a 0-CPU head and Ray's real
autoscaler with two worker types, both at ``min_workers: 0``: ``cpu2`` (2 CPU, up to 2 nodes)
and ``gpu_h100`` (2 CPU, 1 GPU, H100), whose nodes can never start (an object store larger than
any machine), standing for a GPU type whose launches fail (quota, capacity, a bad image).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator import tracking
from orchestrator.autoscaler import limits_from_launcher, limits_from_raycluster
from orchestrator.config import ConfigError
from orchestrator.session import Capacity, Plan, check_plan
from tests.autoscaling import autoscaling_cluster
from tests.conftest import DIGITS, ROOT

PY = sys.executable
TYPES = {
    "cpu2": {"resources": {"CPU": 2}, "max_workers": 2},
    "gpu_h100": {"resources": {"CPU": 2, "GPU": 1, "accelerator_type:H100": 1, "object_store_memory": 10**15},
                 "max_workers": 1},
}
HEAD_SHA = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
SLOW_DATA = ["data.name=synthetic", "data.num_samples=3000", "data.image_size=16", "data.channels=3"]


# ----------------------------------------------------------------------------- no cluster needed


def test_check_plan_uses_the_autoscalers_maximum_not_what_is_up() -> None:
    idle = Capacity(now={"CPU": 0.0}, maximum={"CPU": 4.0, "GPU": 0.0}, node_types=[{"CPU": 2.0}], autoscaler=True,
                    source="cfg.yaml")
    check_plan(Plan(2, 2.0, 0.0), idle)  # nothing is up, but two 2-CPU nodes can be
    with pytest.raises(ConfigError) as e:
        check_plan(Plan(3, 2.0, 0.0), idle)
    msg = str(e.value)
    assert "needs 6 CPU" in msg and "at most 4 CPU" in msg and "cfg.yaml" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"one worker needs 3 CPU on one node.*2 CPU"):
        check_plan(Plan(1, 3.0, 0.0), idle)  # 3 CPU fit the total, but no single node
    fixed = Capacity(now={"CPU": 2.0, "GPU": 0.0})  # no autoscaler: what is up is all there is
    with pytest.raises(ConfigError, match=r"needs 4 CPU but the cluster has 2 CPU"):
        check_plan(Plan(2, 2.0, 0.0), fixed)
    unknown = Capacity(now={"CPU": 0.0}, autoscaler=True)  # limits unreadable: the wait decides
    check_plan(Plan(64, 8.0, 1.0), unknown)


def test_accelerator_type_is_part_of_the_plan() -> None:
    cap = Capacity(now={}, maximum={"CPU": 16.0, "GPU": 2.0, "accelerator_type:A100": 2.0},
                   node_types=[{"CPU": 8.0, "GPU": 1.0, "accelerator_type:A100": 1.0}], autoscaler=True, source="x")
    check_plan(Plan(2, 4.0, 1.0, accelerator_type="A100"), cap)
    with pytest.raises(ConfigError, match="accelerator_type:H100"):
        check_plan(Plan(1, 4.0, 1.0, accelerator_type="H100"), cap)


def test_limits_of_a_launcher_config_respect_type_and_cluster_caps() -> None:
    cfg = {"max_workers": 3, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 0}, "max_workers": 0},
        "small": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 10},
        "big": {"resources": {"CPU": 96, "GPU": 8}, "max_workers": 2}}}
    lim = limits_from_launcher(cfg, "x")
    # 3 nodes at most: the two 8-GPU nodes and one 1-GPU node, not 10 + 2
    assert lim.maximum == {"CPU": 200.0, "GPU": 17.0}
    cfg["available_node_types"]["small"].pop("resources")  # filled in at launch: unknown here
    assert limits_from_launcher(cfg, "x").maximum is None


def test_limits_of_the_shipped_kuberay_manifest() -> None:
    import yaml

    manifest = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    lim = limits_from_raycluster(manifest, "raycluster.yaml")
    groups = manifest["spec"]["workerGroupSpecs"]
    expected_gpus = 0.0
    for g in groups:
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        expected_gpus += g["maxReplicas"] * float(g.get("rayStartParams", {}).get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    assert expected_gpus > 0 and lim.maximum["GPU"] == expected_gpus


# ----------------------------------------------------------------------------- a real autoscaling cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # Worker processes get their environment from the nodes (started by the head), not from
    # the driver: the per-epoch worker records' directory is set on the head.
    debug = tmp_path_factory.mktemp("asc-debug")
    with autoscaling_cluster(TYPES, max_workers=3, extra_env={"SPROUT_DEBUG_DIR": str(debug)}) as c:
        c.debug = debug
        yield c


def _sprout(cluster, tmp: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(cluster.env, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", RAY_DEDUP_LOGS="0")
    return subprocess.run([PY, "-m", "orchestrator", *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _worker_nodes(debug: Path) -> set[str]:
    return {json.loads(p.read_text())["node_id"] for p in debug.rglob("worker-*-epoch-*.json")}


def _wait_idle(cluster, timeout_s: float = 240) -> None:
    """Until the autoscaler has removed every worker node (so a test sees nodes start on demand)."""
    deadline = time.time() + timeout_s
    while cluster.worker_nodes() > 0:
        if time.time() > deadline:
            pytest.fail("the autoscaler never scaled the cluster back to no worker node")
        time.sleep(2)


@pytest.mark.ray
@pytest.mark.slow
def test_plan_beyond_the_maximum_exits_2_naming_it_and_starts_nothing(cluster, tmp_path) -> None:
    out = _sprout(cluster, tmp_path, "train", str(DIGITS), "--name", "too-big",
                  *_sets("scaling.num_workers=4", "scaling.cpus_per_worker=2", "eval.attacks=[pgd20]",
                         f"storage.path={tmp_path / 'rr'}"))
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert "needs 8 CPU" in lines[0] and "at most 6 CPU" in lines[0] and "autoscaler maximum" in lines[0]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "rr").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_train_scales_out_from_no_worker_node_and_evaluates_on_the_workers(cluster, tmp_path) -> None:
    import torch

    from orchestrator.config import load_config
    from orchestrator.evaluate import eval_config, load_model
    from orchestrator.storage import load_checkpoint
    from orchestrator.worker import datasets
    from trainables.evaluation import run_suite

    _wait_idle(cluster)
    head = cluster.head_node_id()
    sets = ["scaling.num_workers=2", "scaling.cpus_per_worker=2", "train.epochs=2", "train.val_pgd_steps=2",
            "eval.attacks=[pgd20]", "eval.n_examples=40", f"storage.path={tmp_path / 'rr'}", "experiment=asc"]
    out = _sprout(cluster, tmp_path, "train", str(DIGITS), "--name", "asc-train", *_sets(*sets))
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert "2/2 up" in out.stderr  # it waited for the autoscaler
    workers = _worker_nodes(cluster.debug / "asc-train")
    assert len(workers) == 2 and head not in workers, (workers, head)

    c = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = c.search_runs([c.get_experiment_by_name("asc").experiment_id])[0]
    assert run.info.status == "FINISHED"
    eval_nodes = set(run.data.tags["sprout.eval_nodes"].split(","))
    assert eval_nodes and head not in eval_nodes, (eval_nodes, head)
    # exact counts: the 2 shards on the workers sum to what one process finds
    cfg = load_config(DIGITS, sets)
    state = load_checkpoint(run.data.tags["sprout.selected_checkpoint"])["model"]
    torch.manual_seed(0)
    local = run_suite(load_model(cfg, state), datasets(cfg, ("test",))["test"], ["pgd20"],
                      eval_config(cfg, ["pgd20"], 40))
    for k in ("test/clean_acc", "test/pgd20_acc"):
        assert run.data.metrics[k] == local.accuracies()[k], k


@pytest.mark.ray
@pytest.mark.slow
def test_two_trial_sweep_scales_to_two_nodes(cluster, tmp_path) -> None:
    _wait_idle(cluster)
    head = cluster.head_node_id()
    sets = ["scaling.cpus_per_worker=1.5", "train.epochs=2", "train.val_pgd_steps=2", "eval.attacks=[]",
            "tune.max_concurrent_trials=2", f"storage.path={tmp_path / 'rr'}", "experiment=asc-sweep", *SLOW_DATA]
    out = _sprout(cluster, tmp_path, "sweep", str(DIGITS), "--space", "sprout_random", "--samples", "2",
                  "--name", "asc-sweep", *_sets(*sets))
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    trials = list(cluster.debug.glob("asc-sweep-*"))  # each trial's records (asc-sweep-<trial id>)
    assert len(trials) == 2, (out.stdout[-3000:], out.stderr[-5000:])
    workers = set().union(*(_worker_nodes(t) for t in trials))
    # 1.5 CPU per trial on 2-CPU nodes: two concurrent trials need two nodes
    assert len(workers) == 2 and head not in workers, (workers, head)
    # the trials ran on other nodes, whose processes do not inherit the driver's environment:
    # each logged its epochs to the driver's MLflow store (not a ./mlflow.db of its own)
    c = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.get_experiment_by_name("asc-sweep").experiment_id
    (parent,) = c.search_runs([exp], filter_string="tags.sprout_kind = 'sweep'")
    children = c.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children), children
    for r in children:
        assert [m.step for m in c.get_metric_history(r.info.run_id, "train/loss")] == [1, 2], r.info.run_id
        assert r.data.tags["git_sha"] == HEAD_SHA


@pytest.mark.ray
@pytest.mark.slow
def test_nodes_that_never_come_fail_after_startup_timeout_with_one_line(cluster, tmp_path) -> None:
    sets = ["scaling.use_gpu=true", "scaling.accelerator_type=H100", "scaling.cpus_per_worker=1", "eval.attacks=[]",
            "scaling.startup_timeout_s=6", f"storage.path={tmp_path / 'rr'}", "experiment=asc-never"]
    out = _sprout(cluster, tmp_path, "train", str(DIGITS), "--name", "never", *_sets(*sets))
    assert out.returncode == 1, (out.stdout[-3000:], out.stderr[-3000:])
    failure = [line for line in out.stderr.splitlines() if line.startswith("sprout:")]
    assert len(failure) == 1, out.stderr
    assert "within scaling.startup_timeout_s = 6 s" in failure[0] and "1 worker(s) with 1 GPU (H100)" in failure[0]
    assert "waiting for 1 worker(s) with 1 GPU (H100): 0/1 up" in out.stderr
    c = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = c.search_runs([c.get_experiment_by_name("asc-never").experiment_id])
    assert run.info.status == "FAILED" and "StartupTimeout" in run.data.tags[tracking.ERROR_TAG]
