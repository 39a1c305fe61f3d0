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
    ap.add_argument("--max-lines", type=int, default=None,
                    help="exit 1 unless the output has at most this many non-blank lines, one line per epoch "
                         "of each method, and ends with the table, the ranking, the masking line and the "
                         "parent run's link (issue 15 asks for ~60)")
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
    if args.max_lines is not None:
        problems = check_output(out.stdout, out.stderr, args.max_lines, epochs=8, methods=sorted(train))
        if problems:
            print("\n".join(["the demo's output does not hold:", *problems, "--- output ---", *lines]))
            return 1
    rows = [f"| make demo wall time | {wall / 60:.0f} min {wall % 60:.0f} s |",
            f"| console lines | {len(lines)} |",
            f"| training, all methods (sum of time/train_total_s) | {res['train_total_s']:.0f} s |"]
    rows += [f"| training {m} | {s:.0f} s |" for m, s in sorted(train.items())]
    rows += [f"| evaluation {m} (sum of its attacks' time, in its shard) | {s:.0f} s |" for m, s in sorted(evals.items())]
    return emit(res, "| what | value |\n|---|---|\n" + "\n".join(rows), args.json)


def check_output(stdout: str, stderr: str, max_lines: int, *, epochs: int, methods: list[str]) -> list[str]:
    """What is wrong with the demo's console output (empty: nothing)."""
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    out = [line for line in stdout.splitlines() if line.strip()]
    problems = []
    if len(lines) > max_lines:
        problems.append(f"{len(lines)} non-blank lines > {max_lines}")
    shown = sorted(line.split("  ")[0] for line in stderr.splitlines() if ": epoch " in line)
    want = sorted(f"compare-digits-small_cnn-{m}: epoch {e}/{epochs}" for m in methods for e in range(1, epochs + 1))
    if shown != want:
        problems.append(f"epoch lines: {len(shown)}, expected one per epoch of each method ({len(want)})")
    head = next((i for i, line in enumerate(out) if line.split()[:2] == ["method", "clean"]), None)
    if head is None or len(out) != head + 2 + len(methods) + 3:
        problems.append("stdout does not end with the table (header, rule, one row per method), ranking, masking, link")
    else:
        if not out[head + 2 + len(methods)].startswith("ranking by "):
            problems.append("no ranking line after the table")
        if not out[-2].startswith("gradient masking: "):
            problems.append("no masking line after the ranking")
        if not out[-1].startswith("MLflow parent run: http://127.0.0.1:5000/#/experiments/"):
            problems.append("the last line is not the parent run's link")
    return problems


if __name__ == "__main__":
    sys.exit(main())
