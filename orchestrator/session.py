"""Ray session and resource planning (SPEC §4 environment, ENVIRONMENT.md's 2-core deadlock).

``RAY_ADDRESS`` set: connect to that cluster. Unset: start a local Ray in process with its
dashboard on 127.0.0.1 (Ray's other ports follow the node address; token auth guards them).
``check_plan`` refuses, before anything starts, a plan the cluster can never schedule (Ray
would otherwise wait silently forever): against the autoscaler's maximum where the cluster
autoscales (``orchestrator.autoscaler``), else against what is up. A plan that fits the
maximum but not the nodes up now waits for the autoscaler (``wait_for_capacity``), up to
``scaling.startup_timeout_s``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import ConfigError

# Tune trial drivers and Ray Data tasks take a sliver of CPU, never a whole core: on small
# machines a trial that holds 1 CPU starves its own Train workers (a silent deadlock).
DRIVER_CPU = 0.01


@dataclass
class Plan:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    trials: int = 1
    accelerator_type: str | None = None
    # a Tune trial's own driver holds DRIVER_CPU (sweep, compare); `sprout train`'s driver and
    # Ray Train's controller hold no CPU
    driver_cpu: float = 0.0

    @property
    def cpus(self) -> float:
        return self.trials * (self.workers * self.cpus_per_worker + self.driver_cpu)

    @property
    def gpus(self) -> float:
        return self.trials * self.workers * self.gpus_per_worker

    def bundle(self) -> dict[str, float]:
        """One training worker's resources, as Ray Train asks for them."""
        b = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            b["GPU"] = self.gpus_per_worker
        if self.accelerator_type:
            b[ACCELERATOR_PREFIX + self.accelerator_type] = ACCELERATOR_SLIVER
        return b

    def totals(self) -> dict[str, float]:
        """One trial's needs: its workers plus the trial driver's sliver of CPU."""
        out = {k: v * self.workers for k, v in self.bundle().items()}
        out["CPU"] = out["CPU"] + self.driver_cpu
        return out

    def describe(self) -> str:
        g = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        a = f" on {self.accelerator_type}" if self.accelerator_type else ""
        t = f"{self.trials} concurrent trial(s) × " if self.trials > 1 else ""
        return (f"{t}{self.workers} worker(s) × ({self.cpus_per_worker:g} CPU{g}){a} = "
                f"{self.cpus:g} CPU, {self.gpus:g} GPU")

    def workers_phrase(self) -> str:
        what = f"{self.gpus_per_worker:g} GPU" if self.gpus_per_worker else f"{self.cpus_per_worker:g} CPU"
        return f"{self.workers} worker(s) with {what}" + (f" ({self.accelerator_type})" if self.accelerator_type else "")


# Ray Train marks a worker's accelerator type with a sliver of this custom resource.
ACCELERATOR_PREFIX, ACCELERATOR_SLIVER = "accelerator_type:", 0.001


def plan_for(cfg: Any, trials: int = 1, *, tune: bool = False) -> Plan:
    """The resources of one run of ``cfg`` (``tune``: as a Tune trial, with its driver's sliver)."""
    s = cfg.scaling
    return Plan(s.num_workers, s.cpus_per_worker, s.gpus_per_worker if s.use_gpu else 0.0, trials,
                s.accelerator_type, DRIVER_CPU if tune else 0.0)


@dataclass
class Capacity:
    """What the cluster has now and, with an autoscaler, what it can grow to.

    ``maximum`` is the autoscaler's ceiling (node types' ``max_workers`` × their resources,
    capped by the cluster-wide ``max_workers``), ``node_types`` the resources of one node of
    each type that exists or can be started. ``maximum`` is None without an autoscaler, and
    when an autoscaler runs whose limits could not be read (``autoscaler`` is then True).
    """

    now: dict[str, float]
    maximum: dict[str, float] | None = None
    node_types: list[dict[str, float]] = field(default_factory=list)
    autoscaler: bool = False
    source: str = "the local machine"

    @property
    def schedulable(self) -> dict[str, float]:
        """What plans are sized against: the autoscaler's maximum where known, else what is up."""
        return self.maximum if self.maximum is not None else self.now


def local_resources() -> dict[str, float]:
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}




def cluster_capacity(connect: bool = False) -> Capacity:
    """The local machine without RAY_ADDRESS; else the cluster's resources now and its autoscaler's maximum."""
    if not os.environ.get("RAY_ADDRESS") and not connect:
        return Capacity(now=local_resources())
    import ray

    ensure_ray()
    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    current_nodes = [{k: float(v) for k, v in n["Resources"].items() if not k.startswith("node:")}
                     for n in ray.nodes() if n.get("Alive")]
    from orchestrator import autoscaler

    limits = autoscaler.read_limits()
    if limits is None:
        return Capacity(now=now, node_types=current_nodes, source="the running cluster")
    if limits.maximum is None:
        return Capacity(now=now, autoscaler=True, source=limits.source)
    # Nodes up now (the head, workers of any type) count towards what the cluster can have.
    maximum = dict(limits.maximum)
    for k, v in now.items():
        if k in ("CPU", "GPU") or k.startswith(ACCELERATOR_PREFIX):
            maximum[k] = max(maximum.get(k, 0.0), v)
    return Capacity(now=now, maximum=maximum, node_types=current_nodes + limits.node_types, autoscaler=True,
                    source=limits.source)


def _fmt(res: dict[str, float], keys: list[str]) -> str:
    return ", ".join(f"{res.get(k, 0.0):g} {k}" for k in keys)


def check_plan(plan: Plan, capacity: Capacity | dict[str, float]) -> None:
    """Refuse (ConfigError, exit 2) a plan the cluster can never run; never starts anything.

    With an autoscaler whose limits are known, the plan is compared with the maximum (a plan
    that fits it but not what is up now waits for nodes: :func:`wait_for_capacity`). Without
    one it is compared with the resources up now. One worker must also fit on one node.
    """
    cap = capacity if isinstance(capacity, Capacity) else Capacity(now=dict(capacity))
    if cap.autoscaler and cap.maximum is None:
        return  # an autoscaler whose limits are unknown: the wait decides (startup_timeout_s)
    have = cap.schedulable
    need = plan.totals()
    keys = [k for k in need if need[k] > 0]
    short = [k for k in keys if need[k] > have.get(k, 0.0) + 1e-9]
    hint = ("lower scaling.num_workers, scaling.cpus_per_worker or scaling.gpus_per_worker "
            "(or set scaling.use_gpu: false)")
    if short:
        what = "can have at most" if cap.maximum is not None else "has"
        where = f" (autoscaler maximum from {cap.source})" if cap.maximum is not None else ""
        raise ConfigError(
            f"scaling: the plan needs {_fmt(need, short)} but the cluster {what} {_fmt(have, short)}{where}; {hint}"
        )
    bundle = plan.bundle()
    if cap.node_types and not any(all(n.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for n in cap.node_types):
        biggest = ", ".join(sorted({_fmt(n, list(bundle)) for n in cap.node_types}))
        raise ConfigError(
            f"scaling: one worker needs {_fmt(bundle, list(bundle))} on one node, but no node of the cluster "
            f"has that (node types: {biggest}); {hint}"
        )


def _per_node_total() -> list[dict[str, float]]:
    import ray

    return [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]


def _workers_up(plan: Plan) -> int:
    """How many of the plan's workers the nodes up now could hold (progress, not scheduling)."""
    bundle = plan.bundle()
    up = 0
    for node in _per_node_total():
        up += int(min(node.get(k, 0.0) / v for k, v in bundle.items()) + 1e-9)
    return min(up, plan.workers)


class StartupTimeout(RuntimeError):
    """The autoscaler did not bring up the plan's nodes within ``scaling.startup_timeout_s``."""


def wait_for_capacity(plan: Plan, *, timeout_s: float, strategy: str = "PACK",
                      say: Any = None, poll_s: float = 1.0, report_every_s: float = 30.0) -> float:
    """Make the plan's demand visible to the autoscaler and wait until its nodes are up.

    The demand is a placement group of the plan's worker bundles (what Ray Train will ask
    for), so the autoscaler starts exactly the nodes the run needs; it is removed once
    ready (the nodes stay up for the autoscaler's idle timeout, and Ray Train then places
    its own group on them). Prints "waiting for 2 worker(s) with 1 GPU: 0/2 up, 3m10s".
    Returns the seconds waited; raises :class:`StartupTimeout` after ``timeout_s``.
    """
    import time
    import uuid

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if say is None:
        from orchestrator.console import console

        say = console.say
    t0 = time.monotonic()
    # a name of its own: the trials of one sweep share a namespace and may wait at the same time
    pg = placement_group([plan.bundle()] * plan.workers, strategy=strategy,
                         name=f"sprout-capacity-wait-{uuid.uuid4().hex[:12]}")
    last_report = -report_every_s
    try:
        while True:
            waited = time.monotonic() - t0
            ready, _ = ray.wait([pg.ready()], timeout=poll_s)
            if ready:
                say(f"{plan.workers_phrase()}: {plan.workers}/{plan.workers} up after {_mmss(time.monotonic() - t0)}")
                return time.monotonic() - t0
            if waited >= timeout_s:
                raise StartupTimeout(
                    f"the autoscaler did not start nodes for {plan.workers_phrase()} within "
                    f"scaling.startup_timeout_s = {timeout_s:g} s ({_workers_up(plan)}/{plan.workers} up); "
                    "check the autoscaler's log (`ray status`, monitor.log) for failed launches or quota"
                )
            if waited - last_report >= report_every_s:
                say(f"waiting for {plan.workers_phrase()}: {_workers_up(plan)}/{plan.workers} up, {_mmss(waited)}")
                last_report = waited
    finally:
        remove_placement_group(pg)


def _mmss(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"


def ensure_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    from orchestrator.tracking import GIT_SHA_ENV, git_sha, tracking_uri

    # Every Ray process of the job (Tune trials, Train workers, evaluation shards), on any
    # node, must log to *this* process's MLflow store and commit, and trials must keep the
    # driver's working directory. Workers on other nodes inherit their node's environment,
    # not this process's: an unforwarded MLFLOW_TRACKING_URI sent a sweep's trials to a
    # `./mlflow.db` in the worker's cwd. Values set by a submitted job's own runtime_env are
    # left to it (Ray refuses to merge the same key twice); credentials are never forwarded
    # (they would show in the job's runtime_env; docs/cluster.md sets them on every node).
    for k, v in {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_CHDIR_TO_TRIAL_DIR": "0",
                 "MLFLOW_TRACKING_URI": tracking_uri(), GIT_SHA_ENV: git_sha()}.items():
        os.environ.setdefault(k, v)
    if not os.environ.get("RAY_ADDRESS"):
        # Ray starts workers at nice 15; on a laptop the training worker is the job, and at
        # low priority it loses CPU share to anything else running (BENCHMARKS.md, Ray overhead).
        os.environ.setdefault("RAY_worker_niceness", "0")
        # Ray Train's PreemptionWatcher polls the cloud for spot-node preemption: one more
        # actor process per run (per Tune trial) that a local instance cannot use, and
        # whose start-up costs seconds on a laptop's cores. Clusters keep it.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    job_env = _submitted_job_env_vars()
    forwarded = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in job_env}
    env = {"env_vars": forwarded} if forwarded else None
    # ray.init replaces the SIGTERM handler (and its C++ core adds one that aborts the
    # process): keep ours, so `sprout train` stops on SIGTERM as on Ctrl-C (exit 130, run KILLED).
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    _init_ray(env)
    if callable(sigterm):
        signal.signal(signal.SIGTERM, sigterm)


# What every Ray process of a `sprout` job gets from the process that started it (ensure_ray).
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "SPROUT_GIT_SHA", "RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_CHDIR_TO_TRIAL_DIR",
                 PREEMPTION_WATCHER_ENV)


def _submitted_job_env_vars() -> dict[str, str]:
    """The env_vars of the runtime_env a `ray job submit` gave this driver ({} outside a job)."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    raw = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    if not raw:
        return {}
    try:
        return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients look first


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init_ray(env: dict[str, Any] | None) -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, runtime_env=env, logging_level="WARNING")
    else:
        # The dashboard hosts the State API that Ray Train's placement-group cleaner polls
        # from inside the job; without it, trials stopped early by ASHA leak their CPUs and
        # later trials never start. Its address is fixed here and handed to the job's
        # processes: left to find it themselves, they scan the host for GCS processes and,
        # with any other Ray running on the machine (another sprout, a `ray start`),
        # fail with "Found multiple active Ray instances", and the cleaner gives up.
        port = _free_port()
        env = dict(env or {})
        env["env_vars"] = {**env.get("env_vars", {}), API_SERVER_ENV: f"http://127.0.0.1:{port}"}
        ray.init(
            # a new local instance, never one that `ray start` left on this machine
            # (/tmp/ray/ray_current_cluster): RAY_ADDRESS unset means "start one here"
            address="local",
            runtime_env=env,
            num_cpus=int(os.cpu_count() or 1),
            include_dashboard=True,  # bound to loopback only
            dashboard_port=port,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
        )
