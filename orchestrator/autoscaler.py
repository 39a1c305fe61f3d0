"""How large an autoscaling Ray cluster can grow: the maximum that plans are checked against.

On an autoscaling cluster the nodes a job needs are usually not up when it starts (every
worker type may sit at ``min_workers: 0``), so a plan is refused only when it exceeds what
the autoscaler can ever start. Ray 2.60 has no single public call for that ceiling; the
sources, first that answers:

1. the cluster config the autoscaler reports to the GCS, which Ray Train's own worker-group
   check reads (``ray._private.state.state.get_cluster_config()``: node groups'
   ``max_count`` × their resources, capped by ``max_resources``);
2. the autoscaling config of the autoscaler serving this cluster on this node: the cluster
   launcher's head runs its monitor with ``--autoscaling-config`` (``ray job submit``
   drivers run on the head, so they see it);
3. ``SPROUT_AUTOSCALER_CONFIG``: a cluster-launcher YAML or a KubeRay ``RayCluster``
   manifest (``workerGroupSpecs[].maxReplicas``), for drivers that run elsewhere.

None of these: the cluster is treated as fixed, and plans are checked against what is up.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_ENV = "SPROUT_AUTOSCALER_CONFIG"
PLANNED = ("CPU", "GPU")


@dataclass
class Limits:
    """The autoscaler's ceiling. ``maximum`` None: an autoscaler runs, its limits are unknown."""

    maximum: dict[str, float] | None
    node_types: list[dict[str, float]] = field(default_factory=list)
    source: str = ""


def read_limits() -> Limits | None:
    """The autoscaler's limits for the connected cluster (None: no autoscaler found)."""
    for reader in (_from_gcs, _from_local_monitor, _from_env):
        limits = reader()
        if limits is not None:
            return limits
    return None


def _ceiling(types: list[tuple[dict[str, float], float]], cap: float | None) -> dict[str, float]:
    """Per resource, the most the cluster can hold: the richest node types first, up to each
    type's count and to ``cap`` worker nodes in all (an upper bound: checks refuse only what
    can never fit)."""
    keys = {k for res, _ in types for k in res}
    out: dict[str, float] = {}
    for k in keys:
        left = math.inf if cap is None or cap < 0 else float(cap)
        total = 0.0
        for res, count in sorted(types, key=lambda t: -t[0].get(k, 0.0)):
            n = min(count, left)
            if n <= 0 or res.get(k, 0.0) <= 0:
                continue
            if math.isinf(n):
                return {**out, k: math.inf}
            total += n * res[k]
            left -= n
        out[k] = total
    return out


def limits_from_launcher(config: dict[str, Any], source: str) -> Limits:
    """Limits of a Ray cluster-launcher config (``available_node_types``, ``max_workers``)."""
    types = []
    head = config.get("head_node_type")
    for name, spec in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        res = spec.get("resources")
        if res is None:  # filled in from the instance type at launch: unknown here
            return Limits(None, source=source)
        types.append(({k: float(v) for k, v in res.items()}, float(spec.get("max_workers", 0))))
    maximum = _ceiling(types, config.get("max_workers"))
    return Limits(maximum, [res for res, n in types if n > 0], source)


def _k8s_quantity(v: Any) -> float:
    s = str(v)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def limits_from_raycluster(manifest: dict[str, Any], source: str) -> Limits:
    """Limits of a KubeRay ``RayCluster`` (or ``RayJob``'s ``rayClusterSpec``): worker groups'
    ``maxReplicas`` × the resources each pod gives Ray (``rayStartParams`` first, else the
    container limits, as KubeRay does)."""
    spec = manifest.get("spec", {})
    spec = spec.get("rayClusterSpec", spec)
    types = []
    for group in spec.get("workerGroupSpecs", []):
        params = group.get("rayStartParams", {}) or {}
        container = group["template"]["spec"]["containers"][0]
        limits = (container.get("resources") or {}).get("limits", {}) or {}
        res: dict[str, float] = {}
        cpu = params.get("num-cpus", limits.get("cpu"))
        gpu = params.get("num-gpus", limits.get("nvidia.com/gpu"))
        if cpu is not None:
            res["CPU"] = _k8s_quantity(cpu)
        if gpu is not None and _k8s_quantity(gpu) > 0:
            res["GPU"] = _k8s_quantity(gpu)
        extra = params.get("resources")
        if extra:
            res.update({k: float(v) for k, v in json.loads(str(extra).strip("'\"").replace('\\"', '"')).items()})
        types.append((res, float(group.get("maxReplicas", group.get("replicas", 0)))))
    return Limits(_ceiling(types, None), [res for res, n in types if n > 0], source)


def limits_from_file(path: str) -> Limits:
    import yaml

    p = Path(path).expanduser()
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError) as e:
        from orchestrator.config import ConfigError

        raise ConfigError(f"{CONFIG_ENV}={path}: not a readable YAML/JSON autoscaler config ({e})") from None
    for d in docs:
        if d.get("kind") in ("RayCluster", "RayJob", "RayService"):
            return limits_from_raycluster(d, str(p))
        if "available_node_types" in d:
            return limits_from_launcher(d, str(p))
    from orchestrator.config import ConfigError

    raise ConfigError(f"{CONFIG_ENV}={path}: expected a cluster-launcher config (available_node_types) "
                      "or a KubeRay RayCluster/RayJob manifest")


def _from_env() -> Limits | None:
    path = os.environ.get(CONFIG_ENV)
    return limits_from_file(path) if path else None


def _from_gcs() -> Limits | None:
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or newer Ray without this call: try the next source
        return None
    if config is None or not config.node_group_configs:
        return None
    types = []
    for g in config.node_group_configs:
        count = math.inf if g.max_count == -1 else float(g.max_count)
        types.append(({k: float(v) for k, v in g.resources.items()}, count))
    maximum = _ceiling(types, None)
    for k, v in config.max_resources.items():
        if k in maximum:
            maximum[k] = min(maximum[k], float(v))
    return Limits(maximum, [res for res, n in types if n > 0], "the autoscaler's cluster config (GCS)")


def _from_local_monitor() -> Limits | None:
    """The autoscaling config of this cluster's autoscaler, when it runs on this node."""
    path = monitor_config_path()
    if path is None:
        return None
    if path == "":
        return None  # a monitor without an autoscaling config: a fixed-size cluster
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return Limits(None, source=path)
    return limits_from_launcher(config, path)


def monitor_config_path() -> str | None:
    """``--autoscaling-config`` of the autoscaler monitor serving the connected cluster's GCS
    on this node; "" when its monitor runs without one; None when none is found here."""
    import ray

    gcs = ray.get_runtime_context().gcs_address
    port = gcs.rsplit(":", 1)[-1]
    for cmd in _command_lines():
        if not any(part.endswith(("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")) for part in cmd):
            continue
        addr = next((a.split("=", 1)[1] for a in cmd if a.startswith("--gcs-address=")), "")
        if addr.rsplit(":", 1)[-1] != port:
            continue  # another cluster's autoscaler on the same machine
        return next((a.split("=", 1)[1] for a in cmd if a.startswith("--autoscaling-config=")), "")
    return None


def _command_lines() -> Iterator[list[str]]:
    """Every process's argv on this (Linux) node, from /proc."""
    for d in Path("/proc").glob("[0-9]*"):
        try:
            raw = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            yield raw.decode(errors="replace").rstrip("\0").split("\0")

