"""What a user sees: `sprout`'s own lines on the terminal, everything else in a log file.

``capture(path)`` points file descriptors 1 and 2 of this process at a log file, so Ray's
and the workers' output (streamed to the driver by Ray), Tune's status tables, C++ core
logs and warnings all land there, and keeps duplicates of the terminal's descriptors for
``say``/``out``. ``watch`` follows training runs through their MLflow metrics and shows one
line per run: redrawn in place on a terminal, one plain line per epoch otherwise (``ray job
logs``, CI, a file). ``--verbose`` skips the capture: everything streams as before.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


class _Console:
    def __init__(self) -> None:
        self._out: IO[str] | None = None
        self._err: IO[str] | None = None
        self.log_path: Path | None = None
        self._lock = threading.Lock()

    @property
    def err(self) -> IO[str]:
        return self._err or sys.stderr

    @property
    def stdout(self) -> IO[str]:
        return self._out or sys.stdout

    @property
    def tty(self) -> bool:
        try:
            return self.err.isatty()
        except (ValueError, OSError):
            return False

    def say(self, line: str = "") -> None:
        """A progress or status line for the user (stderr)."""
        with self._lock:
            print(line, file=self.err, flush=True)

    def out(self, text: str = "") -> None:
        """A result for the user (stdout)."""
        with self._lock:
            print(text, file=self.stdout, flush=True)

    def capture(self, log_path: Path) -> None:
        """From here on, this process's stdout and stderr (and its children's) go to ``log_path``."""
        if self.log_path is not None:
            return
        log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        self._err = os.fdopen(os.dup(2), "w", buffering=1)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.log_path = log_path
        self.say(f"log: {log_path}  (Ray's and the workers' output; --verbose prints it here)")

    # The processes whose last lines explain a failed run: Train workers and their controller,
    # Tune trials, evaluation shards (not Ray's own helpers, e.g. the placement-group cleaner).
    WORKER_MARKERS = ("(RayTrainWorker", "(TrainController", "(ImplicitFunc", "(_trial", "(_eval_shard")

    def tail(self, n: int = 12) -> list[str]:
        """The workers' last ``n`` non-blank lines in the log (shown with a failure); the log's
        last lines when no worker wrote any."""
        if self.log_path is None or not self.log_path.is_file():
            return []
        sys.stdout.flush()
        sys.stderr.flush()
        with self.log_path.open("rb") as f:
            f.seek(max(0, self.log_path.stat().st_size - 256_000))
            lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        workers = [line for line in lines if any(m in line for m in self.WORKER_MARKERS)]
        return (workers or lines)[-n:]


console = _Console()


@dataclass
class _Watched:
    run_id: str
    label: str
    epochs: int
    shown: int = 0  # epochs already printed
    started: float = field(default_factory=time.time)
    bar: Any = None
    state: str = "starting"  # starting, running, finished, stopped early, killed, failed
    last: str = ""  # the row's epoch text, kept when only the state changes
    # shown only once it runs in this watch: a comparison's second phase finds the first
    # phase's finished runs among the parent's children, and must not show them again
    active: bool = True


# MLflow run status → the word a user reads in the run's row
_STATES = {"RUNNING": "running", "SCHEDULED": "starting", "FINISHED": "finished", "KILLED": "killed",
           "FAILED": "failed"}
_TERMINAL = ("finished", "stopped early", "killed", "failed")


def _fmt_s(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


def epoch_line(label: str, epoch: int, epochs: int, m: dict[str, float], eta_s: float) -> str:
    parts = [f"{label}: epoch {epoch}/{epochs}"]
    if "train/loss" in m:
        parts.append(f"loss {m['train/loss']:.4f}")
    if "val/clean_acc" in m:
        parts.append(f"val clean {m['val/clean_acc']:.3f}")
    if "val/pgd_acc" in m:
        parts.append(f"pgd {m['val/pgd_acc']:.3f}")
    if "time/epoch_s" in m:
        parts.append(f"{m['time/epoch_s']:.1f} s/epoch")
    if epoch < epochs:
        parts.append(f"ETA {_fmt_s(eta_s)}")
    return "  ".join(parts)


class Watcher:
    """Follows runs' state and per-epoch MLflow metrics from a background thread.

    On a terminal each run has one row, redrawn in place: ``label state [bar] epoch k/N
    loss … ETA``. Otherwise one plain line per epoch, plus one line when a run ends failed
    or stopped early (a clean finish and an interrupt say so elsewhere).
    ``unfinished``: the state of a run still RUNNING in MLflow when watching ends without an
    error (a single run: its driver finishes it next; a sweep's trial: stopped by the scheduler).
    """

    KEYS = ("train/loss", "val/clean_acc", "val/pgd_acc", "time/epoch_s")

    def __init__(self, uri: str, interval_s: float = 1.0, unfinished: str = "finished") -> None:
        self.uri, self.interval_s, self.unfinished = uri, interval_s, unfinished
        self.runs: dict[str, _Watched] = {}
        self.discover: Any = None  # (client) -> [(run_id, label, epochs, run)], for sweeps and comparisons
        self.started_ms = int(time.time() * 1000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sprout-console", daemon=True)

    def add(self, run_id: str, label: str, epochs: int, done: int = 0, active: bool = True) -> None:
        if run_id not in self.runs:
            self.runs[run_id] = _Watched(run_id, label, epochs, shown=done, active=active)

    def _loop(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        while not self._stop.wait(self.interval_s):
            try:
                self.poll(client)
            except Exception:  # noqa: BLE001 - a display must never break the run
                pass
        try:
            self.poll(client)
        except Exception:  # noqa: BLE001
            pass

    def poll(self, client: Any) -> None:
        """One look at every watched run. Each MLflow call is an HTTP request (and a password
        check) on a production server, so a quiet poll costs one ``get_run`` (none for runs a
        sweep's or comparison's search just returned) and one metric history per run; the other
        metrics are fetched only when a new epoch is there to print."""
        found: dict[str, Any] = {}
        if self.discover is not None:
            for run_id, label, epochs, run in self.discover(client):
                found[run_id] = run
                if run_id in self.runs:
                    continue
                # a run from before this watch (a resumed trial, an earlier phase): its epochs
                # so far were shown then; only what it does from now on is shown
                earlier = run.info.start_time is not None and run.info.start_time < self.started_ms
                done = len(client.get_metric_history(run_id, "train/loss")) if earlier else 0
                self.add(run_id, label, epochs, done, active=run.info.status == "RUNNING")
        for w in list(self.runs.values()):
            run = found[w.run_id] if w.run_id in found else client.get_run(w.run_id)
            if not w.active and run.info.status != "RUNNING":
                continue
            w.active = True
            hist = {"train/loss": {m.step: m.value for m in client.get_metric_history(w.run_id, "train/loss")}}
            steps = sorted(hist["train/loss"])
            new = [s for s in steps if s > w.shown]
            if new:
                for k in self.KEYS[1:]:
                    hist[k] = {m.step: m.value for m in client.get_metric_history(w.run_id, k)}
            state = _STATES.get(run.info.status, run.info.status.lower())
            if state == "running" and not steps:
                state = "starting"  # Ray is placing its workers: no epoch yet
            if state == "finished" and run.data.tags.get("sprout.early_stopped") == "true":
                state = "stopped early"
            before, w.state = w.state, state if not new else ("running" if state == "starting" else state)
            for s in new:
                m = {k: v[s] for k, v in hist.items() if s in v}
                per = [hist["time/epoch_s"][e] for e in sorted(hist["time/epoch_s"]) if e <= s]
                eta = (w.epochs - s) * (sum(per[-3:]) / len(per[-3:])) if per else float("nan")
                self._show(w, s, m, eta)
            if new:
                w.shown = new[-1]
            elif w.state != before or (console.tty and w.bar is None):
                self._show_state(w)

    def _row(self, w: _Watched) -> Any:
        if w.bar is None:
            from tqdm.auto import tqdm

            w.bar = tqdm(total=w.epochs, desc=w.label, position=len([r for r in self.runs.values() if r.bar]),
                         file=console.err, leave=True, dynamic_ncols=True, bar_format="{desc} {bar:12} {postfix}")
        return w.bar

    def _show(self, w: _Watched, epoch: int, m: dict[str, float], eta: float) -> None:
        w.last = epoch_line("", epoch, w.epochs, m, eta).removeprefix(": ")
        if console.tty:
            bar = self._row(w)
            bar.n = epoch
            bar.set_description_str(f"{w.label} {w.state:<8}", refresh=False)
            bar.set_postfix_str(w.last, refresh=True)
        else:
            console.say(epoch_line(w.label, epoch, w.epochs, m, eta))

    def _show_state(self, w: _Watched, quiet_states: tuple[str, ...] = ("starting", "running", "finished", "killed")) -> None:
        """The run's state changed without a new epoch (started, ended, failed)."""
        if console.tty:
            bar = self._row(w)
            bar.set_description_str(f"{w.label} {w.state:<8}", refresh=False)
            bar.set_postfix_str(w.last or f"epoch 0/{w.epochs}", refresh=True)
        elif w.state not in quiet_states:
            console.say(f"{w.label}: {w.state} after epoch {w.shown}/{w.epochs}")

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        # runs MLflow still calls RUNNING: what ended the watch tells their state
        end = self.unfinished if exc_type is None else (
            "killed" if issubclass(exc_type, KeyboardInterrupt) else "failed")
        for w in self.runs.values():
            if w.active and w.state not in _TERMINAL:
                w.state = end
                if end != "failed" or w.bar is not None:  # a failure's one line is printed by the CLI
                    self._show_state(w, quiet_states=("finished", "killed", "failed"))
            if w.bar is not None:
                w.bar.close()


@contextmanager
def watch_run(uri: str, run_id: str, label: str, epochs: int, done: int = 0) -> Iterator[Watcher]:
    with Watcher(uri) as w:
        w.add(run_id, label, epochs, done)
        yield w


def children_finder(experiment: str, parent_run_id: str, epochs_of: Any) -> Any:
    """A :class:`Watcher` ``discover`` function: every child run of a sweep or comparison, with
    its label and epoch count (``epochs_of(run)``), found by one ``search_runs`` per poll."""

    def discover(client: Any) -> list[tuple[str, str, int, Any]]:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  max_results=1000)
        return [(r.info.run_id, r.data.tags.get("mlflow.runName", r.info.run_id[:8]), epochs_of(r), r) for r in runs]

    return discover


@contextmanager
def watch_children(uri: str, experiment: str, parent_run_id: str, epochs_of: Any) -> Iterator[Watcher]:
    """Follow every child run of a sweep or comparison as it appears (``epochs_of(run)`` → total)."""
    w = Watcher(uri, unfinished="stopped early")  # a trial Tune stopped before its last epoch
    w.discover = children_finder(experiment, parent_run_id, epochs_of)
    with w:
        yield w


def epochs_from_params(run: Any, default: int) -> int:
    """A child run's epoch count from its logged params (Free-AT: divided by its replays)."""
    p = run.data.params
    epochs = int(p.get("train.epochs", default))
    replays = int(p.get(f"{p.get('method', '')}.replays", 1))
    return max(1, math.ceil(epochs / replays))

