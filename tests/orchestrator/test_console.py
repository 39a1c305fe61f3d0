"""What a user sees from `sprout train` (issue 15): a few lines of our own, one per epoch, the
log file's path, and everything Ray and the workers print in that log file. Real
subprocesses: a run whose loss turns NaN, and under a real pseudo-terminal (tmux) whose screen is captured.
Checked on runs other tests make anyway: a finished run without a terminal on the production
server's run (test_mlflow_server.py), --verbose on the S3 resumed run (test_s3_storage.py's
``s3_resumed_run``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DIGITS, ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PY = sys.executable
NOISE = ("TrainingReport", "Checkpoint successfully created", "PreemptionWatcher")
HANG_GUARD_S = 600


def _cmd(name: str, tmp: Path, *sets: str, verbose: bool = False) -> list[str]:
    base = [f"storage.path={tmp / 'rr'}", "eval.attacks=[]", "train.val_pgd_steps=2", "experiment=console"]
    return [PY, "-m", "orchestrator", "train", str(DIGITS), "--name", name, *(["--verbose"] if verbose else []),
            *[a for s in [*base, *sets] for a in ("--set", s)]]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")
    for k in ("RAY_ADDRESS", "SPROUT_DEBUG_DIR"):
        env.pop(k, None)
    return env


def _run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(tmp), cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)


def _log_path(text: str) -> Path:
    m = re.search(r"^log: (\S+)", text, re.M)
    assert m, text
    return Path(m.group(1))


def test_nan_loss_fails_the_run_naming_epoch_step_and_method_keeps_the_good_checkpoint_and_shows_the_log(
        tmp_path) -> None:
    """LR x1e30 after one good epoch: the loss overflows in epoch 2; no Ray retry. A real `sprout
    train`: exit 1, the workers' own last lines from the log file, then one `sprout:` line."""
    import json

    import torch

    from orchestrator import tracking
    from orchestrator.console import console
    from trainables.checkpoint import load_checkpoint

    name = "nan"
    sets = ["method=natural", "train.epochs=2", "train.schedule=step", "train.milestones=[0.5]", "train.gamma=1e30",
            "train.val_pgd_steps=0", "train.checkpoint_keep=10"]
    out = subprocess.run(_cmd(name, tmp_path, *sets), env=dict(_env(tmp_path), SPROUT_DEBUG_DIR=str(tmp_path / "debug")),
                         cwd=ROOT, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 1, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("sprout:")]
    assert ours == lines[-1:], lines[-5:]  # one line of ours, the last
    assert lines[-1].startswith(f"sprout: train failed: RuntimeError: training run '{name}' failed: "
                                "non-finite loss at epoch 2, step "), lines[-1]
    assert "(method natural)" in lines[-1] and "the last good checkpoint is kept" in lines[-1], lines[-1]
    assert int(lines[-1].split("non-finite loss at epoch 2, step ")[1].split()[0]) >= 1
    # before it: the training processes' own last lines (not Ray's helpers' noise), as the log has them
    log = _log_path(out.stderr)
    assert any(line == f"the workers' last lines in the log {log}:" for line in lines)
    shown = [line[4:] for line in lines if line.startswith("  | ")]
    logged = [s[:400] for s in log.read_text().splitlines() if any(m in s for m in console.WORKER_MARKERS)]
    assert shown and shown == logged[-len(shown):]
    assert any("(RayTrainWorker" in line for line in shown), shown
    assert not any("PlacementGroupCleaner" in line for line in shown), shown

    c = tracking.client(_env(tmp_path)["MLFLOW_TRACKING_URI"])
    (run,) = c.search_runs([c.get_experiment_by_name("console").experiment_id],
                           filter_string=f"tags.`{tracking.RUN_KEY}` = '{name}'")
    assert run.info.status == "FAILED"
    assert "non-finite loss at epoch 2" in run.data.tags[tracking.ERROR_TAG]
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train/loss")] == [1]  # epoch 2 never logged
    ckpts = sorted(d for d in (tmp_path / "rr" / name).glob("checkpoint_*") if d.is_dir())
    assert len(ckpts) == 1, ckpts
    state = load_checkpoint(ckpts[0])
    assert state["epoch"] == 0  # the epoch-1 checkpoint, intact and loadable
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    pids = [json.loads((tmp_path / "debug" / name / f"worker-0-epoch-{e}.json").read_text())["pid"] for e in (0, 1)]
    assert pids[0] == pids[1], "Ray restarted the worker: a NaN was retried"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_on_a_terminal_the_run_line_is_redrawn_in_place(tmp_path) -> None:
    """A real pseudo-terminal (tmux): the screen holds one line for the run, redrawn per epoch,
    with its state; then the evaluation's bar for the model names the attack it is running.
    The screen is captured while the run trains: the same single row shows earlier epochs first."""
    sock = str(tmp_path / "tmux.sock")
    script = tmp_path / "run.sh"
    env = _env(tmp_path)
    exports = "".join(f"export {k}={v!r}\n" for k, v in env.items() if k.isidentifier() and "'" not in v)
    # an evaluation of several seconds (PGD-200, 18 blocks), so that captures 0.2 s apart see its bar move
    cmd = _cmd("tty", tmp_path, "train.epochs=6", "eval.attacks=[pgd200]", "eval.n_examples=359", "eval.batch_size=20")
    script.write_text(f"{exports}cd {ROOT}\n{' '.join(repr(a) if '[' in a else a for a in cmd)}\n"
                      f"echo EXIT=$?\nsleep 600\n")
    subprocess.run(["tmux", "-S", sock, "new-session", "-d", "-x", "200", "-y", "50", f"bash {script}"], check=True)
    seen: list[int] = []  # the epoch the run's row showed, capture after capture
    states: list[str] = []  # the state the run's row showed, capture after capture
    eval_rows: list[str] = []
    try:
        deadline = time.time() + HANG_GUARD_S
        screen = ""
        while "EXIT=" not in screen:
            if time.time() > deadline:
                pytest.fail(f"sprout train did not finish under tmux:\n{screen}")
            time.sleep(0.2)
            screen = subprocess.run(["tmux", "-S", sock, "capture-pane", "-p", "-J"], capture_output=True,
                                    text=True).stdout
            rows = [line for line in screen.splitlines() if line.startswith("tty ")]
            assert len(rows) <= 1, screen  # never a second line for the run
            m = re.search(r"epoch (\d)/6", rows[0]) if rows else None
            if m and (not seen or seen[-1] != int(m.group(1))):
                seen.append(int(m.group(1)))
            if rows and (not states or states[-1] != rows[0].split()[1]):
                states.append(rows[0].split()[1])
            eval_rows += [line for line in screen.splitlines() if line.startswith("eval tty")]
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], capture_output=True)
    assert "EXIT=0" in screen, screen
    rows = [line for line in screen.splitlines() if line.startswith("tty ")]
    assert len(rows) == 1, screen  # one line for the run, not one per epoch
    assert "epoch 6/6" in rows[0] and "val clean" in rows[0], rows
    # the one row was redrawn: it showed an earlier epoch before the last, in order
    assert len(seen) >= 2 and seen == sorted(seen) and seen[-1] == 6, seen
    # its state: starting (no epoch yet) or running while it trained, finished at the end
    assert states[-1] == "finished" and "running" in states and set(states) <= {"starting", "running", "finished"}, states
    assert rows[0].startswith("tty finished ")
    # the evaluation: one bar for the model, naming the attack it is on (clean, then pgd200) and its share done
    assert eval_rows and all(re.match(r"eval tty  (clean \(1/2\)|pgd200 \(2/2\)|done) .* +\d+%$", r.rstrip())
                             for r in eval_rows), eval_rows
    shares = [int(r.rstrip()[-4:-1]) for r in eval_rows if "pgd200 (2/2)" in r]
    assert len(set(shares)) >= 2 and shares == sorted(shares) and 0 < shares[0] < 100, eval_rows  # it moved
    assert not any(n in screen for n in NOISE), screen
