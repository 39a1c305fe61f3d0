"""`make test`: the suite as two pytest lanes at once, each in a CPU cgroup of equal weight.

Why: run serially, the suite keeps a 2-core machine's CPUs ~70 % busy (process start-ups, Ray's
RPCs, servers waiting on each other); a second lane takes that idle share (BENCHMARKS.md,
stops 28-30). Why cgroups: with the kernel's autogroups every new session (each test's `sprout`,
Ray, servers) is its own scheduling group of full weight, so a lane in a low-weight group starved
(stop 28) and two plain processes share by how many sessions each starts. In two sibling cgroups
of equal weight the two lanes share the CPUs lane to lane, whatever they start.

Lane B runs ``LANE_B`` (heavy real-process modules: about 40 % of the serial time), lane A the rest.
Lane A's output streams; lane B's follows when both are done. The exit status is lane A's when
it failed, else lane B's. Without a writable cgroup-v1 ``cpu`` controller, or with test paths
given, one serial pytest runs instead (the same tests, the same result). Ctrl-C and SIGTERM
reach both lanes.

    python tests/lanes.py [--lane-b PATH ...] [pytest options]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_CGROUP = Path("/sys/fs/cgroup/cpu")
LANE_B = (
    "tests/orchestrator/test_s3_storage.py",
    "tests/orchestrator/test_compare.py",
    "tests/orchestrator/test_sweep.py",
    "tests/orchestrator/test_console.py",
)


def cgroup_root(base: Path = CPU_CGROUP) -> Path | None:
    """The cgroup-v1 cpu hierarchy when this process may make groups in it, else None."""
    ok = (base / "cgroup.procs").is_file() and (base / "cpu.shares").is_file() and os.access(base, os.W_OK)
    return base if ok else None


def _join(group: Path | None) -> None:
    if group is not None:  # in the child, before exec: it and all it starts stay in the group
        (group / "cgroup.procs").write_text(str(os.getpid()))


def _remove(group: Path, base: Path) -> None:
    """Move what is left in ``group`` (processes a test leaked) back to the root, then remove it."""
    try:
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                (base / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        group.rmdir()
    except OSError:
        pass


def parse(argv: list[str]) -> tuple[list[str], list[str]]:
    """(lane B's paths, pytest's arguments) from ``argv``."""
    lane_b, rest, it = [], [], iter(argv)
    for a in it:
        if a == "--lane-b":
            lane_b.append(next(it, ""))
        elif a.startswith("--lane-b="):
            lane_b.append(a.split("=", 1)[1])
        else:
            rest.append(a)
    if any(not p for p in lane_b):
        raise SystemExit("lanes: --lane-b needs a test path")
    return lane_b or list(LANE_B), rest


def main(argv: list[str] | None = None, base: Path = CPU_CGROUP) -> int:
    lane_b, args = parse(sys.argv[1:] if argv is None else argv)
    pytest = [sys.executable, "-m", "pytest"]
    root = cgroup_root(base)
    if root is None or any(not a.startswith("-") and Path(a.split("::")[0]).exists() for a in args):
        why = "test paths given" if root is not None else f"no writable cgroup-v1 cpu controller at {base}"
        print(f"lanes: one serial pytest ({why})", flush=True)
        return subprocess.call([*pytest, *args])

    groups = [root / f"sprout-tests-{os.getpid()}-{lane}" for lane in "ab"]
    for g in groups:
        g.mkdir()
        (g / "cpu.shares").write_text("1024")
    tmp = Path(tempfile.mkdtemp(prefix="sprout-lanes-"))
    print(f"lanes: A = the rest, B = {' '.join(lane_b)} (cgroups {groups[0].name}, {groups[1].name})", flush=True)
    log_b = (tmp / "lane-b.log").open("w+")
    procs: list[subprocess.Popen] = []
    try:
        a = [*pytest, *args, *[f"--ignore={p}" for p in lane_b], f"--basetemp={tmp / 'a'}"]
        b = [*pytest, *args, *lane_b, f"--basetemp={tmp / 'b'}"]
        procs.append(subprocess.Popen(a, preexec_fn=lambda: _join(groups[0])))  # noqa: PLW1509 - no threads here
        procs.append(subprocess.Popen(b, stdout=log_b, stderr=subprocess.STDOUT,
                                      preexec_fn=lambda: _join(groups[1])))  # noqa: PLW1509

        def forward(signum, _frame):
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signum)

        old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            codes = [p.wait() for p in procs]
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for g in groups:
            _remove(g, root)
        log_b.seek(0)
        print(f"\n===== lane B: {' '.join(lane_b)} =====", flush=True)
        sys.stdout.write(log_b.read())
        sys.stdout.flush()
        log_b.close()
    print(f"lanes: A exited {codes[0]}, B exited {codes[1]}", flush=True)
    return codes[0] or codes[1]


if __name__ == "__main__":
    sys.exit(main())
