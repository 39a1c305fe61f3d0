"""Log-uniform α, a and Δ for random or Bayesian (Optuna) search of SPROUT."""

from ray import tune

from search_spaces.registry import SPACES


@SPACES.register("sprout_random")
def sprout_random() -> dict:
    return {
        "method": "sprout",
        "sprout.dirichlet_alpha": tune.loguniform(1e-3, 0.3),
        "sprout.mixup_alpha": tune.loguniform(0.05, 2.0),
        "sprout.gaussian_delta": tune.loguniform(0.01, 0.3),
    }
