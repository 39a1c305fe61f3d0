"""How much faster N processes finish N pieces of CPU work than one process finishes one.

A machine reporting N CPUs need not run N busy processes at N times one's throughput: vCPUs can
be hyperthreads of fewer cores, or share a host. This measures it side by side in one run: the
same fixed pure-Python work (``--work`` loop iterations) timed alone, then as ``--procs`` copies started together (default: every CPU),
alternating, ``--repeats`` times. Printed: seconds alone, mean seconds per copy together, and the
effective cores ``procs x alone / together`` (``procs`` where the CPUs are real and idle, 1.0 where
they are one core's worth). BENCHMARKS.md (CI wall time, stop 28) uses it to tell real cores from
hyperthreads before running a second pytest lane on the 2-core CI machine.

    .venv/bin/python benchmarks/cpu_parallelism.py [--procs N] [--work 30000000] [--repeats 3] [--json F]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._emit import emit  # noqa: E402 - needs the repo root on sys.path


def _work(n: int, start: mp.Event, out: mp.Queue) -> None:
    start.wait()
    t = time.perf_counter()
    x = 0
    for i in range(n):
        x += i * i
    out.put(time.perf_counter() - t)


def timed(n: int, procs: int) -> list[float]:
    """Seconds each of ``procs`` processes took for ``n`` units of work, all started together."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    ps = [ctx.Process(target=_work, args=(n, start, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    time.sleep(0.5)  # let every copy finish starting before the clock
    start.set()
    secs = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", type=int, default=30_000_000, help="loop iterations per copy")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the numbers as JSON here (- for stdout)")
    args = ap.parse_args(argv)
    if args.procs < 1 or args.repeats < 1 or args.work < 1:
        ap.error("--procs, --repeats and --work must be at least 1")
    work = args.work
    alone, together = [], []
    for _ in range(args.repeats):  # alternating, so that a drift in the machine's speed hits both
        alone += timed(work, 1)
        together += timed(work, args.procs)
    a, t = statistics.mean(alone), statistics.mean(together)
    res = {"work": work, "procs": args.procs, "cpu_count": os.cpu_count(),
           "alone_s": alone, "together_s": together, "effective_cores": args.procs * a / t}
    table = (f"| loop work {work} | alone s | each of {args.procs} together s | effective cores |\n"
             f"|---|---:|---:|---:|\n"
             f"| mean of {args.repeats} | {a:.2f} | {t:.2f} | {res['effective_cores']:.2f} of {args.procs} |")
    return emit(res, table, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
