"""benchmarks/step_cost.py runs end to end on a tiny setting and reports every method
against natural (a smoke test of the script; timings themselves are never asserted)."""

from __future__ import annotations

import importlib.util
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from trainables import METHODS

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_cost.py"


def load():
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_cost_times_every_registered_method_against_natural(tmp_path, capsys):
    before = torch.get_num_threads()
    out = tmp_path / "r.json"
    try:
        rc = load().main(["--dataset", "synthetic", "--image-size", "8", "--channels", "1", "--batch-size", "8",
                          "--rounds", "2", "--steps", "1", "--warmup", "1", "--threads", "1", "--json", str(out)])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    res = json.loads(out.read_text())
    names = [r["method"] for r in res["results"]]
    assert names[0] == "natural" and sorted(names) == sorted(METHODS)
    for r in res["results"]:
        assert r["ms_per_step"] > 0 and r["n_timed"] == 2
        assert r["ms_per_batch"] == r["ms_per_step"] * r["steps_per_batch"]
    assert res["results"][0]["ratio_vs_natural"] == 1.0
    assert {r["method"]: r["steps_per_batch"] for r in res["results"]}["free_at"] == 8
    printed = capsys.readouterr().out
    assert "| sprout |" in printed and "SPROUT step / natural step" in printed


def test_step_cost_method_subset_always_includes_natural_and_runs_as_a_script():
    """As a script (a subprocess, since --no-malloc-trim changes the process's allocator)."""
    cmd = [sys.executable, str(SCRIPT), "--dataset", "synthetic", "--image-size", "8", "--channels", "1",
           "--batch-size", "4", "--rounds", "1", "--steps", "1", "--warmup", "0", "--threads", "1",
           "--methods", "sprout", "--no-malloc-trim", "--json", "-"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [ln.split("|")[1].strip() for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert rows[1:] == ["natural", "sprout"]
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert [x["method"] for x in res["results"]] == ["natural", "sprout"]
    assert res["malloc_no_trim"] is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
