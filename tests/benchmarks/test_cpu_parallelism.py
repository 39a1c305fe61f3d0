"""benchmarks/cpu_parallelism.py end to end on tiny work: the effective cores it prints are
``procs x mean(alone) / mean(together)`` of the times it recorded (timings are never asserted)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_parallelism.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_effective_cores_are_procs_times_alone_over_together():
    r = _run("--procs", "2", "--work", "20000", "--repeats", "2", "--json", "-")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert len(res["alone_s"]) == 2 and len(res["together_s"]) == 4  # every copy of every repeat
    want = 2 * statistics.mean(res["alone_s"]) / statistics.mean(res["together_s"])
    assert res["effective_cores"] == pytest.approx(want, rel=1e-12)
    assert f"| {want:.2f} of 2 |" in r.stdout


@pytest.mark.parametrize("option", ["--procs", "--repeats", "--work"])
def test_bad_counts_exit_2_naming_the_option(option):
    r = _run(option, "0")
    assert r.returncode == 2 and "--procs, --repeats and --work must be at least 1" in r.stderr, r.stderr
