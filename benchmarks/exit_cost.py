"""How long a `sprout` process takes to end after its last line, with and without CPython's teardown.

The same command (default: a 1-epoch digits `sprout train` without attacks, in a fresh
directory) runs as ``python -m orchestrator`` (``cli.run``: :func:`orchestrator.cli.exit_now`)
and as ``sys.exit(cli.main())`` (Python's normal exit), alternating, ``--repeats`` times. For
each run the script times, on its own clock, the command's last output line and the process's
exit: the gap is the atexit handlers (Ray's shutdown of its local instance) plus, in the second
variant, the interpreter's teardown of its modules. Printed: mean gap and mean wall time per
variant, and their ratios. A line is stamped when this script reads it, so for a command whose
output comes only at its exit (``validate``) the gap reads ~0 and can dip below it.

    .venv/bin/python benchmarks/exit_cost.py [--repeats 2] [--json F] [-- sprout arguments]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._emit import emit  # noqa: E402 - needs the repo root on sys.path

DEFAULT_ARGS = ["train", str(ROOT / "configs" / "digits.yaml"), "--name", "exit", "--set", "train.epochs=1",
                "--set", "eval.attacks=[]"]
VARIANTS = {
    "exit_now (python -m orchestrator)": ["-m", "orchestrator"],
    "normal exit (sys.exit(main()))": ["-c", "import sys; from orchestrator.cli import main; sys.exit(main())"],
}


def timed_run(prefix: list[str], args: list[str]) -> tuple[float, float, int]:
    """(seconds from the last output line to the exit, wall seconds, exit code) of one run."""
    with tempfile.TemporaryDirectory(prefix="exit-cost-") as cwd:
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlflow.db", PYTHONPATH=str(ROOT))
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, *prefix, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        last = [t0]

        def follow(stream) -> None:
            for _ in stream:
                last[0] = max(last[0], time.perf_counter())

        readers = [threading.Thread(target=follow, args=(s,)) for s in (p.stdout, p.stderr)]
        for r in readers:
            r.start()
        rc = p.wait()
        end = time.perf_counter()
        for r in readers:
            r.join()
    return end - last[0], end - t0, rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the numbers as JSON here (- for stdout)")
    ap.add_argument("sprout_args", nargs=argparse.REMAINDER, help="after --: the sprout command (default: a 1-epoch train)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    cmd = [a for a in args.sprout_args if a != "--"] or DEFAULT_ARGS
    res: dict = {"command": cmd, "runs": {name: [] for name in VARIANTS}}
    for _ in range(args.repeats):  # alternating, so that a drift in the machine's speed hits both
        for name, prefix in VARIANTS.items():
            gap, wall, rc = timed_run(prefix, cmd)
            if rc != 0:
                print(f"{name}: exit code {rc}", file=sys.stderr)
                return 1
            res["runs"][name].append({"after_last_line_s": gap, "wall_s": wall})
    rows, means = [], {}
    for name, runs in res["runs"].items():
        gap = statistics.mean(r["after_last_line_s"] for r in runs)
        wall = statistics.mean(r["wall_s"] for r in runs)
        means[name] = (gap, wall)
        rows.append(f"| {name} | {gap:.2f} | {wall:.1f} |")
    (fast_gap, fast_wall), (slow_gap, slow_wall) = means.values()
    res["gap_ratio"], res["wall_ratio"] = slow_gap / fast_gap, slow_wall / fast_wall
    table = (f"| variant (mean of {args.repeats}) | last line → exit s | wall s |\n|---|---:|---:|\n"
             + "\n".join(rows)
             + f"\n| normal / exit_now | {res['gap_ratio']:.2f}x | {res['wall_ratio']:.3f}x |")
    return emit(res, table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
