"""A real autoscaling Ray cluster on this machine: Ray's own autoscaler with its fake provider.

``ray start --head --autoscaling-config=…`` with ``RAY_FAKE_CLUSTER=1`` runs Ray 2.60's
real (v1) autoscaler, which starts and stops local worker nodes on demand, as
``ray.cluster_utils.AutoscalingCluster`` does. That class runs ``ray stop --force`` (every
Ray process on the host) and reads an ``example.yaml`` the wheel lacks, so the head is
started here instead: its own process group, a private ``--temp-dir``, free ports on
127.0.0.1, token auth with a private token, and stopped by its process group only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
HEAD_TYPE = "ray.head.default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AutoscalingCluster:
    address: str
    dashboard: str
    env: dict[str, str]  # what a client (`sprout`, `ray job submit`) needs
    temp_dir: Path
    config: dict[str, Any]

    def head_node_id(self) -> str:
        return self.run_py("ray.get_runtime_context().get_node_id()")

    def run_py(self, expr: str) -> str:
        """``expr`` evaluated by a Ray client of the cluster (the autoscaler's event lines that
        Ray prints to clients are told apart by a marker)."""
        code = f"import ray; ray.init(logging_level='ERROR'); print('RESULT=' + str({expr}))"
        out = subprocess.run([sys.executable, "-c", code], env=dict(self.env, RAY_SCHEDULER_EVENTS="0"),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT=")]
        return line.removeprefix("RESULT=")

    def worker_nodes(self) -> int:
        """Alive nodes other than the head."""
        return int(self.run_py("sum(1 for n in ray.nodes() if n['Alive'] and 'node:__internal_head__' not in n['Resources'])"))


def launcher_config(worker_types: dict[str, dict[str, Any]], gcs_port: int, max_workers: int,
                    idle_timeout_minutes: float = 0.25) -> dict[str, Any]:
    """A cluster-launcher config for the fake provider (the base config the wheel lacks)."""
    types = {name: {"node_config": {}, "min_workers": 0, **spec} for name, spec in worker_types.items()}
    types[HEAD_TYPE] = {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    return {
        "cluster_name": "sprout-test", "max_workers": max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": types, "head_node_type": HEAD_TYPE, "auth": {"ssh_user": "ubuntu"}, "docker": {},
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [], "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


@contextmanager
def autoscaling_cluster(worker_types: dict[str, dict[str, Any]], *, max_workers: int,
                        extra_env: dict[str, str] | None = None) -> Iterator[AutoscalingCluster]:
    # Unix socket paths must stay short (< 108 bytes): a short private directory under /tmp.
    temp = Path(tempfile.mkdtemp(prefix="sprout-asc-", dir="/tmp"))
    gcs, dash = free_port(), free_port()
    config = launcher_config(worker_types, gcs, max_workers)
    cfg_path = temp / "autoscaling.json"
    cfg_path.write_text(json.dumps(config))
    token = secrets.token_hex(32)
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}:{os.environ['PATH']}", **(extra_env or {}))
    head_env = dict(base, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    log = (temp / "head.log").open("w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--autoscaling-config={cfg_path}", f"--port={gcs}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=0",
         f"--temp-dir={temp / 'ray'}", "--disable-usage-stats"],
        env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    client_env = dict(base, RAY_ADDRESS=f"127.0.0.1:{gcs}")
    cluster = AutoscalingCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", client_env, temp, config)
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in (temp / "head.log").read_text():
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the autoscaling head did not start:\n{(temp / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield cluster
    finally:
        _stop_group(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _stop_group(head: subprocess.Popen, grace_s: float = 5.0) -> None:
    """The head and every node the autoscaler started (all in the head's process group)."""
    pgid = head.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace_s
    while time.time() < deadline:
        head.poll()  # reap the group leader, or it stays a zombie member of the group
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)
