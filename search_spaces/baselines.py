"""Baselines' knobs: PGD-AT ε and steps, TRADES β."""

from ray import tune

from search_spaces.registry import SPACES


@SPACES.register("baselines")
def baselines() -> dict:
    return {
        "method": tune.grid_search(["pgd_at", "trades"]),
        "pgd_at.steps": tune.choice([3, 7, 10]),
        "trades.beta": tune.choice([1.0, 6.0]),
    }
