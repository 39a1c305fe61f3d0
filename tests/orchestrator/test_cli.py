"""How a `sprout` process ends: main's exit code, after its threads, atexit handlers and output,
without CPython's teardown of every module (``orchestrator.cli.exit_now``, used by ``run``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DIGITS, ROOT

# A module-level object whose finaliser prints: only CPython's teardown of modules deletes it.
TEARDOWN_PROBE = """
import sys


class _Probe:
    def __del__(self):
        sys.stdout.write("module teardown ran\\n")
        sys.stdout.flush()


probe = _Probe()
"""

EXIT_SCRIPT = """
import atexit, sys, threading, time
# registered before any library's handler, so it runs last (atexit is LIFO): after any of them
# that flushes stdout, only exit_now's own flush can get this line out
atexit.register(lambda: sys.stdout.write("atexit ran\\n"))
import teardown_probe  # noqa: F401
from orchestrator.cli import exit_now

def late():
    time.sleep(0.5)
    with open(sys.argv[1], "w") as f:
        f.write("thread finished")

threading.Thread(target=late).start()  # not a daemon: a normal exit waits for it
sys.stdout.write("unflushed output\\n")
exit_now(3)
"""


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "teardown_probe.py").write_text(TEARDOWN_PROBE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    env.pop("PYTHONUNBUFFERED", None)  # stdout to a pipe stays block-buffered, as for most users
    return env


def test_exit_now_waits_for_threads_runs_atexit_flushes_then_skips_the_teardown(tmp_path):
    marker = tmp_path / "thread.txt"
    r = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(marker)], env=_env(tmp_path), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert marker.read_text() == "thread finished"  # the non-daemon thread was joined first
    assert r.stdout.splitlines() == ["unflushed output", "atexit ran"], r.stdout  # flushed, in order
    assert "module teardown ran" not in r.stdout


@pytest.mark.parametrize(("entry", "config", "code"), [("console script", str(DIGITS), 0), ("python -m", "missing.yaml", 2)])
def test_the_sprout_command_exits_with_mains_code_through_exit_now(tmp_path, entry, config, code):
    (tmp_path / "sitecustomize.py").write_text("import teardown_probe  # noqa: F401\n")
    cmd = ([str(Path(sys.executable).parent / "sprout")] if entry == "console script"
           else [sys.executable, "-m", "orchestrator"])
    r = subprocess.run([*cmd, "validate", config], env=_env(tmp_path), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == code, r.stderr
    # the result (print() to a pipe: block-buffered) or the one-line error was flushed
    assert ("# resource plan:" in r.stdout) if code == 0 else ("missing.yaml" in r.stderr), (r.stdout, r.stderr)
    assert "module teardown ran" not in r.stdout  # run() ended through exit_now
