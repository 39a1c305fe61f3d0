"""Wall time of `make demo` (= `sprout compare configs/digits.yaml`) and where it goes.

Runs the demo command in a fresh working directory (its own ./mlflow.db and ./ray_results),
quietly (the console lines go to a file), then reads the phases back from MLflow: each
method's training time, the evaluation's time per attack, and what is left (Ray and
per-trial start-up, report, figures). SPEC §8 target: <= 5 min on 2 CPU cores.

    .venv/bin/python benchmarks/demo_time.py [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._emit import emit  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", help="also write the numbers as JSON here (- for stdout)")
    args = ap.parse_args()
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as d:
        cwd = Path(d)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        t0 = time.time()
        out = subprocess.run([sys.executable, "-m", "orchestrator", "compare", str(ROOT / "configs" / "digits.yaml")],
                             cwd=cwd, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if out.returncode != 0:
            raise SystemExit(f"the demo failed ({out.returncode}): {out.stderr[-3000:]}")
        lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
        c = MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
        exp = c.get_experiment_by_name("sprout-digits")
        runs = c.search_runs([exp.experiment_id])
        parent = next(r for r in runs if r.data.tags.get("sprout_kind") == "compare")
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        train = {r.data.tags["method"]: r.data.metrics.get("time/train_total_s", 0.0) for r in children}
        evals = {r.data.tags["method"]: sum(v for k, v in r.data.metrics.items() if k.startswith("time/eval_"))
                 for r in children}
    res = {"wall_s": round(wall, 1), "console_lines": len(lines), "train_s": train, "eval_cpu_s": evals,
           "train_total_s": round(sum(train.values()), 1)}
    rows = [f"| make demo wall time | {wall / 60:.0f} min {wall % 60:.0f} s |",
            f"| console lines | {len(lines)} |",
            f"| training, all methods (sum of time/train_total_s) | {res['train_total_s']:.0f} s |"]
    rows += [f"| training {m} | {s:.0f} s |" for m, s in sorted(train.items())]
    rows += [f"| evaluation {m} (sum of its attacks' time, in its shard) | {s:.0f} s |" for m, s in sorted(evals.items())]
    return emit(res, "| what | value |\n|---|---|\n" + "\n".join(rows), args.json)


if __name__ == "__main__":
    sys.exit(main())
