"""What MLflow 3's job executor costs an `mlflow server` that sprout starts (and why it is off).

Starts the same `mlflow server` (SQLite store, 127.0.0.1, one worker) twice, side by side in one
run: with MLflow's default (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` unset: a job runner plus its
huey consumers) and as sprout starts it (``false``: cluster/aws.yaml, gcp.yaml,
kuberay/mlflow.yaml, `make ui`). For each: seconds until ``/health`` answers, then after
``--settle`` more seconds the processes in the server's process group, their CPU seconds and their
proportional set size (PSS, ``/proc/PID/smaps_rollup``: shared pages split between processes).

    .venv/bin/python benchmarks/mlflow_server_jobs.py [--settle 45] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.services import BIN, free_port, group_pids  # noqa: E402 - needs the repo root on sys.path

TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _pss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(job_execution: str | None, settle_s: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="mlflow-jobs-") as tmp:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"}
        if job_execution is not None:
            env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = job_execution
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp}/m.db",
             "--default-artifact-root", f"{tmp}/artifacts", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"mlflow server exited ({proc.returncode})")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):  # noqa: S310
                        break
                except OSError:
                    time.sleep(0.2)
            health_s = time.perf_counter() - t0
            time.sleep(settle_s)
            pids = group_pids(proc.pid)
            cpu = sum(_cpu_s(p) for p in pids)
            pss = sum(_pss_mb(p) for p in pids)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            deadline = time.time() + 30
            while group_pids(proc.pid) and time.time() < deadline:
                time.sleep(0.2)
    return {"health_s": health_s, "processes": len(pids), "cpu_s": cpu, "pss_mb": pss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settle", type=float, default=45.0, help="seconds after /health before measuring")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for _ in range(args.repeats):  # alternate, so that drift of the machine's speed hits both
        rows.append(("MLflow default (job executor on)", measure(None, args.settle)))
        rows.append(("as sprout starts it (off)", measure("false", args.settle)))
    print(f"{'server':36} {'/health s':>9} {'processes':>9} {'CPU s':>7} {'PSS MB':>8}   "
          f"(CPU and PSS {args.settle:g} s after /health)")
    for name, r in rows:
        print(f"{name:36} {r['health_s']:9.1f} {r['processes']:9d} {r['cpu_s']:7.1f} {r['pss_mb']:8.0f}")
    on = [r for n, r in rows if "on)" in n]
    off = [r for n, r in rows if "off)" in n]
    for key in ("cpu_s", "pss_mb"):
        a, b = sum(r[key] for r in on) / len(on), sum(r[key] for r in off) / len(off)
        print(f"{key}: default / sprout's = {a / b:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
