"""benchmarks/exit_cost.py end to end on `sprout validate` (no Ray): both variants run, their
ratios are the recorded means' ratios, a failing command exits 1 (timings are never asserted)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DIGITS

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "exit_cost.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_ratios_are_normal_exit_over_exit_now_of_the_recorded_runs():
    r = _run("--repeats", "1", "--json", "-", "--", "validate", str(DIGITS))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["command"] == ["validate", str(DIGITS)]
    (fast, slow) = res["runs"].values()
    assert len(fast) == len(slow) == 1
    mean = lambda runs, k: statistics.mean(x[k] for x in runs)  # noqa: E731
    assert res["gap_ratio"] == pytest.approx(mean(slow, "after_last_line_s") / mean(fast, "after_last_line_s"), rel=1e-12)
    assert res["wall_ratio"] == pytest.approx(mean(slow, "wall_s") / mean(fast, "wall_s"), rel=1e-12)
    assert f"| {res['gap_ratio']:.2f}x |" in r.stdout


def test_a_failing_command_exits_1_naming_the_variant():
    r = _run("--repeats", "1", "--", "validate", "missing.yaml")
    assert r.returncode == 1 and "exit_now (python -m orchestrator): exit code 2" in r.stderr, r.stderr
