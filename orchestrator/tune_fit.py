"""Fitting a Ray Tune experiment so that Ctrl-C and SIGTERM stop it the same, resumable way.

Ray Tune 2.60 handles the first SIGINT itself: it stops the trials, saves the experiment
state and returns from ``Tuner.fit()`` as if the experiment had ended. ``sprout sweep`` and
``sprout compare`` must know it was interrupted (parent and unfinished child runs KILLED,
exit 130, a re-run resumes via ``Tuner.restore``), and SIGTERM (preemption, ``ray job
stop``, Kubernetes) must take the same graceful path rather than abandoning the loop.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from orchestrator import tracking


class Interrupted(KeyboardInterrupt):
    """A Tune experiment stopped by SIGINT/SIGTERM; its state is saved and a re-run resumes it."""


def _not_handled_by_tune(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def fit_tuner(tuner: Any) -> Any:
    """``tuner.fit()`` with SIGTERM routed to Tune's graceful SIGINT stop.

    Returns the result grid; raises :class:`Interrupted` when a signal stopped the
    experiment (Tune saved its state first). Callers close their MLflow runs before letting
    it propagate (see :func:`close_after`).
    """
    if threading.current_thread() is not threading.main_thread() or int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0")):
        return tuner.fit()  # Tune does not catch signals here: they raise as usual
    # Tune swaps in its own SIGINT handler inside fit() and puts the previous one back only
    # when that handler fires: finding our sentinel back after fit() is how we learn that
    # the loop ended on a signal (the trials' statuses read TERMINATED either way once Tune
    # has cleaned up). Restoring the caller's handler also keeps a later Ctrl-C working.
    prev_int = signal.signal(signal.SIGINT, _not_handled_by_tune)

    def forward(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            raise KeyboardInterrupt(f"signal {signum}")
        handler(signal.SIGINT, frame)

    prev_term = signal.signal(signal.SIGTERM, forward)
    try:
        grid = tuner.fit()
        stopped = signal.getsignal(signal.SIGINT) is _not_handled_by_tune
    finally:
        signal.signal(signal.SIGINT, prev_int)
        signal.signal(signal.SIGTERM, prev_term)
    if stopped:
        raise Interrupted(f"{tuner_name(grid)} stopped by a signal; Tune saved its state")
    return grid


def tuner_name(grid: Any) -> str:
    try:
        return f"Tune experiment {grid.experiment_path!r}"
    except Exception:  # noqa: BLE001 - only for the message
        return "Tune experiment"


def close_running_children(c: Any, experiment: str, parent_run_id: str, status: str = "KILLED") -> list[str]:
    """Mark the parent's child runs still RUNNING as ``status``; returns their run ids.

    Trials stopped by Tune leave their MLflow run RUNNING (see ``runner.run_training``), so
    the driver, which knows why they stopped, is the one place that closes them.
    """
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], max_results=1000, filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"))
    for r in runs:
        c.set_terminated(r.info.run_id, status=status)
    return [r.info.run_id for r in runs]


def close_after(c: Any, experiment: str, parent_run_id: str, error: BaseException) -> None:
    """After ``error`` escaped a sweep/compare: KILLED for an interrupt, FAILED otherwise."""
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        close_running_children(c, experiment, parent_run_id, status)
    finally:
        c.set_terminated(parent_run_id, status=status)
        if status == "FAILED":
            c.set_tag(parent_run_id, tracking.ERROR_TAG, f"{type(error).__name__}: {error}"[:5000])
