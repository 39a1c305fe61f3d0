"""Ray session and resource planning (SPEC §4 environment, ENVIRONMENT.md's 2-core deadlock).

``RAY_ADDRESS`` set: connect to that cluster. Unset: start a local Ray in process with its
dashboard on 127.0.0.1 (Ray's other ports follow the node address; token auth guards them).
``check_plan`` refuses, before anything starts, a plan the cluster cannot schedule (Ray
would otherwise wait silently forever).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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

    @property
    def cpus(self) -> float:
        return self.trials * (self.workers * self.cpus_per_worker + DRIVER_CPU)

    @property
    def gpus(self) -> float:
        return self.trials * self.workers * self.gpus_per_worker

    def describe(self) -> str:
        g = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        t = f"{self.trials} concurrent trial(s) × " if self.trials > 1 else ""
        return f"{t}{self.workers} worker(s) × ({self.cpus_per_worker:g} CPU{g}) = {self.cpus:g} CPU, {self.gpus:g} GPU"


def plan_for(cfg: Any, trials: int = 1) -> Plan:
    s = cfg.scaling
    return Plan(s.num_workers, s.cpus_per_worker, s.gpus_per_worker if s.use_gpu else 0.0, trials)


def local_resources() -> dict[str, float]:
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def available_resources(connect: bool = False) -> dict[str, float]:
    """Cluster totals: the local machine without RAY_ADDRESS, else the cluster's (connects)."""
    if not os.environ.get("RAY_ADDRESS") and not connect:
        return local_resources()
    import ray

    ensure_ray()
    res = ray.cluster_resources()
    return {"CPU": float(res.get("CPU", 0)), "GPU": float(res.get("GPU", 0))}


def check_plan(plan: Plan, available: dict[str, float]) -> None:
    problems = []
    if plan.workers * plan.cpus_per_worker + DRIVER_CPU > available["CPU"] + 1e-9:
        problems.append(f"{plan.workers * plan.cpus_per_worker + DRIVER_CPU:g} CPU")
    if plan.workers * plan.gpus_per_worker > available["GPU"] + 1e-9:
        problems.append(f"{plan.workers * plan.gpus_per_worker:g} GPU")
    if problems:
        raise ConfigError(
            f"scaling: the plan needs {' and '.join(problems)} but the cluster has "
            f"{available['CPU']:g} CPU and {available['GPU']:g} GPU; lower scaling.num_workers, "
            "scaling.cpus_per_worker or scaling.gpus_per_worker (or set scaling.use_gpu: false)"
        )


def ensure_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    from orchestrator.tracking import tracking_uri

    # Tune trials must keep the driver's working directory, and every Ray process must log
    # to the driver's MLflow store (the default SQLite path is relative to the cwd). Only
    # variables this process defaults are forwarded: a job's own runtime_env may set the
    # others, and Ray refuses to merge the same key twice.
    defaults = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_CHDIR_TO_TRIAL_DIR": "0",
                "MLFLOW_TRACKING_URI": tracking_uri()}
    if not os.environ.get("RAY_ADDRESS"):
        # Ray starts workers at nice 15; on a laptop the training worker is the job, and at
        # low priority it loses CPU share to anything else running (BENCHMARKS.md, Ray overhead).
        os.environ.setdefault("RAY_worker_niceness", "0")
    forwarded = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(forwarded)
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


def _init_ray(env: dict[str, Any] | None) -> None:
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, runtime_env=env)
    else:
        ray.init(
            runtime_env=env,
            num_cpus=int(os.cpu_count() or 1),
            # The dashboard hosts the State API that Ray Train's placement-group cleaner
            # polls; without it, trials stopped early by ASHA leak their CPUs and later
            # trials never start. It binds to loopback only.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
        )
