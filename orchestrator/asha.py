"""ASHA for ``sprout sweep``: rungs by trained epoch, and a trial's last epoch ends it itself.

Tune's ``ASHAScheduler`` answers STOP when a result reaches ``max_t`` (and at the top rung, for
a trial below the median there). A Tune STOP kills the trial's actor at once, so a trial that
had *finished* training never logged its final model, ``time/train_total_s`` or its selected
checkpoint (``runner.run_training`` does that after ``fit()``). Stops before the last epoch are
ASHA's early stopping and are kept. Imported only where a sweep is built (Ray Tune is heavy)."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

EPOCH = "epoch"  # the 1-based trained epoch every report carries (orchestrator/ray_train.py)
EPOCHS = "epochs"  # and the run's own epoch count (Free-AT: train.epochs divided by its replays)


class EpochASHA(ASHAScheduler):
    def __init__(self, *, epochs: int, grace_period: int, reduction_factor: float, **kwargs: Any) -> None:
        # time by the epoch each report carries, not Tune's result count: a trial resumed after a
        # stopped or killed driver counts its results again from its restart, so it was judged
        # at the wrong rung (its epoch-3 metrics as "iteration 2") and never reached max_t
        super().__init__(time_attr=EPOCH, max_t=epochs, grace_period=grace_period,
                         reduction_factor=reduction_factor, **kwargs)
        self.epochs = epochs

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)  # records the rung either way
        if action == TrialScheduler.STOP and result.get(EPOCH, 0) >= result.get(EPOCHS, self.epochs):
            return TrialScheduler.CONTINUE  # trained to the end: let it log its model and finish
        return action
