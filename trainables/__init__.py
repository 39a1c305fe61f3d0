"""SPROUT's training core: plain PyTorch, no Ray and no MLflow (SPEC §9).

    from trainables import METHODS, MODELS, DATASETS, ATTACKS, dirichlet_targets
"""

from trainables import attacks, data, methods, models  # noqa: F401  (fill the registries)
from trainables.registry import ATTACKS, DATASETS, METHODS, MODELS
from trainables.sprout import dirichlet_targets, gaussian_augment, mixup, soft_cross_entropy, uniform_smooth

__all__ = [
    "ATTACKS",
    "DATASETS",
    "METHODS",
    "MODELS",
    "dirichlet_targets",
    "gaussian_augment",
    "mixup",
    "soft_cross_entropy",
    "uniform_smooth",
]
