"""Time from `sprout train` to its first epoch on an autoscaling cluster: cold (no worker node
up; the autoscaler starts one) vs warm (the node is already up), side by side in one run.

The cluster is Ray's real autoscaler with its fake provider on this machine
(tests/autoscaling.py), so "cold" measures Ray's side only (demand seen, node process
started, workers placed), not a cloud VM's boot, which adds minutes (docs/cluster.md).

    .venv/bin/python benchmarks/autoscaling_startup.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._emit import emit  # noqa: E402
from tests.autoscaling import autoscaling_cluster  # noqa: E402

TYPES = {"cpu2": {"resources": {"CPU": 2}, "max_workers": 1}}


def first_epoch_s(cluster, tmp: Path, name: str) -> float:
    """Seconds from launching `sprout train` to the MLflow timestamp of its first epoch."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = dict(cluster.env, MLFLOW_TRACKING_URI=uri)
    sets = ["scaling.cpus_per_worker=2", "train.epochs=1", "eval.attacks=[]", f"storage.path={tmp / 'rr'}",
            "experiment=bench-asc"]
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "orchestrator", "train", str(ROOT / "configs" / "digits.yaml"),
                          "--name", name, *[a for s in sets for a in ("--set", s)]],
                         env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"sprout train failed: {out.stderr[-2000:]}")
    c = MlflowClient(uri)
    run = c.search_runs([c.get_experiment_by_name("bench-asc").experiment_id],
                        filter_string=f"tags.`sprout.run_key` = '{name}'")[0]
    (m,) = c.get_metric_history(run.info.run_id, "train/loss")
    return m.timestamp / 1000.0 - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="also write the numbers as JSON here (- for stdout)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d, autoscaling_cluster(TYPES, max_workers=1) as cluster:
        tmp = Path(d)
        for i in range(args.repeats):
            while cluster.worker_nodes():  # cold: wait until the autoscaler removed the idle node
                time.sleep(2)
            cold = first_epoch_s(cluster, tmp, f"cold-{i}")
            warm = first_epoch_s(cluster, tmp, f"warm-{i}")  # the node started for "cold" is still up
            rows.append({"cold_s": round(cold, 1), "warm_s": round(warm, 1), "cold_over_warm": round(cold / warm, 2)})
    table = "\n".join(["| run | cold (no node up) s | warm (node up) s | cold / warm |", "|---|---|---|---|"]
                      + [f"| {i} | {r['cold_s']} | {r['warm_s']} | {r['cold_over_warm']} |" for i, r in enumerate(rows)])
    return emit({"rows": rows, "note": "fake provider: a node start is a local process, not a VM boot"}, table,
                args.json)


if __name__ == "__main__":
    sys.exit(main())
