"""Training methods: SPROUT and the baselines it is compared against (SPEC §2)."""

from trainables.methods import adversarial, natural, sprout  # noqa: F401  (register)
from trainables.methods.base import Method, StepOutput, params_from_dict
from trainables.registry import METHODS


def build_method(name: str, params: dict | None = None, *, num_classes: int, lr: float, seed: int = 0) -> Method:
    """METHODS[name] with its params section validated (unknown keys and bad values raise)."""
    cls = METHODS[name]
    return cls(params_from_dict(cls.Params, name, params), num_classes=num_classes, lr=lr, seed=seed)


__all__ = ["METHODS", "Method", "StepOutput", "build_method", "params_from_dict"]
