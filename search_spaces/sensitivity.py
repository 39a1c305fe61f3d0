"""The paper's Fig. 5 sensitivity grid: Dirichlet α × Mixup a, plus Gaussian Δ."""

from ray import tune

from search_spaces.registry import SPACES


@SPACES.register("sensitivity")
def sensitivity() -> dict:
    return {
        "method": "sprout",
        "sprout.dirichlet_alpha": tune.grid_search([0.001, 0.01, 0.1]),
        "sprout.mixup_alpha": tune.grid_search([0.1, 0.2, 0.5]),
        "sprout.gaussian_delta": tune.grid_search([0.1]),
    }


@SPACES.register("sensitivity_small")
def sensitivity_small() -> dict:
    """A 2×2 corner of the Fig. 5 grid, for quick checks and CI."""
    return {
        "method": "sprout",
        "sprout.dirichlet_alpha": tune.grid_search([0.01, 0.1]),
        "sprout.mixup_alpha": tune.grid_search([0.2, 1.0]),
    }
