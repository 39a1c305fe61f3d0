"""`make test`'s two-lane runner (tests/lanes.py) on tiny suites of its own, started for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import lanes

RUNNER = Path(lanes.__file__)
GUARD_S = 300  # only a guard against hangs (the lanes run beside the whole suite)
# Where no cgroup-v1 cpu group can be made (cgroup v2 only, not root) `make test` runs one serial
# pytest, which the last tests check; the two-lane tests then skip (listed in .ci/allowed-skips).
needs_cgroups = pytest.mark.skipif(lanes.cgroup_root() is None,
                                   reason="no writable cgroup-v1 cpu controller: make test runs serially here")

# Each test waits for the other lane's test to start: it passes only if both lanes run at once.
RENDEZVOUS = '''
import os, pathlib, time
def test_{me}():
    out = pathlib.Path(os.environ["LANES_OUT"])
    (out / "{me}.cgroup").write_text(
        next(l for l in open("/proc/self/cgroup") if l.split(":")[1].split(",").count("cpu"))
        .split(":", 2)[2].strip())
    (out / "{me}.pid").write_text(str(os.getpid()))
    deadline = time.time() + float(os.environ.get("LANES_WAIT", "120"))
    while not (out / "{other}.pid").exists():
        if time.time() > deadline:  # a hang guard, not a timing claim
            raise AssertionError("the other lane never started")
        time.sleep(0.05)
    time.sleep(float(os.environ.get("LANES_HOLD", "0")))
    assert os.environ.get("LANES_FAIL") != "{me}", "{me} failed on purpose"
'''


def _suite(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    proj, out = tmp_path / "proj", tmp_path / "out"
    proj.mkdir()
    out.mkdir()
    (proj / "test_a.py").write_text(RENDEZVOUS.format(me="a", other="b"))
    (proj / "test_b.py").write_text(RENDEZVOUS.format(me="b", other="a"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "CI")}
    return out, {**env, "LANES_OUT": str(out)}


def _run(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), "--lane-b", "test_b.py", "-q", "-p", "no:cacheprovider"],
                          cwd=tmp_path / "proj", env=env, capture_output=True, text=True, timeout=GUARD_S)


@needs_cgroups
def test_the_two_lanes_run_at_once_each_in_its_own_cpu_cgroup(tmp_path) -> None:
    out, env = _suite(tmp_path)
    proc = _run(tmp_path, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    groups = {lane: (out / f"{lane}.cgroup").read_text() for lane in "ab"}
    assert groups["a"].endswith("-a") and groups["b"].endswith("-b"), groups
    assert groups["a"].startswith("/sprout-tests-") and groups["a"][:-2] == groups["b"][:-2], groups
    assert not (lanes.CPU_CGROUP / groups["a"].lstrip("/")).exists()  # removed afterwards
    assert not (lanes.CPU_CGROUP / groups["b"].lstrip("/")).exists()
    text = proc.stdout
    assert text.index("1 passed") < text.index("===== lane B: test_b.py =====") < text.rindex("1 passed")
    assert text.rstrip().endswith("lanes: A exited 0, B exited 0")


@needs_cgroups
@pytest.mark.parametrize("failing", ["a", "b"])
def test_a_failure_in_either_lane_fails_the_run_and_is_shown(tmp_path, failing) -> None:
    out, env = _suite(tmp_path)
    proc = _run(tmp_path, {**env, "LANES_FAIL": failing})
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert f"{failing} failed on purpose" in proc.stdout
    assert f"lanes: A exited {int(failing == 'a')}, B exited {int(failing == 'b')}" in proc.stdout


@needs_cgroups
def test_sigterm_to_the_runner_stops_both_lanes(tmp_path) -> None:
    out, env = _suite(tmp_path)
    runner = subprocess.Popen([sys.executable, str(RUNNER), "--lane-b", "test_b.py", "-q", "-p", "no:cacheprovider"],
                              cwd=tmp_path / "proj", env={**env, "LANES_HOLD": "300"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + GUARD_S
        while not all((out / f"{lane}.pid").exists() for lane in "ab"):
            if runner.poll() is not None or time.time() > deadline:  # a hang guard, not a timing claim
                pytest.fail(f"the lanes never both started: {runner.stdout.read() if runner.poll() is not None else ''}")
            time.sleep(0.05)
        time.sleep(0.5)  # both now hold for 300 s
        pids = [int((out / f"{lane}.pid").read_text()) for lane in "ab"]
        runner.send_signal(signal.SIGTERM)
        text, _ = runner.communicate(timeout=GUARD_S)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode != 0, text
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "===== lane B: test_b.py =====" in text


def test_without_a_cgroup_controller_one_serial_pytest_runs_everything(tmp_path, monkeypatch, capfd) -> None:
    out, env = _suite(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LANES_WAIT", "0")  # one process: neither waits for the other
    (out / "b.pid").write_text("0")  # test_a finds "b" started; test_b then finds a's pid
    monkeypatch.chdir(tmp_path / "proj")
    code = lanes.main(["--lane-b", "test_b.py", "-q", "-p", "no:cacheprovider"], base=tmp_path / "no-cgroup")
    text = capfd.readouterr().out
    assert code == 0, text
    assert f"lanes: one serial pytest (no writable cgroup-v1 cpu controller at {tmp_path / 'no-cgroup'})" in text
    assert "2 passed" in text and "lane B" not in text


def test_lane_b_paths_are_parsed_out_of_the_pytest_arguments() -> None:
    assert lanes.parse(["-q", "--lane-b", "x.py", "--lane-b=y.py", "-x"]) == (["x.py", "y.py"], ["-q", "-x"])
    assert lanes.parse(["-q"]) == (list(lanes.LANE_B), ["-q"])
    with pytest.raises(SystemExit, match="--lane-b needs a test path"):
        lanes.parse(["--lane-b"])
    assert all((lanes.ROOT / p).is_file() for p in lanes.LANE_B)
