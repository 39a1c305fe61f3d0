"""Natural training (cross-entropy) and uniform label smoothing (Szegedy et al. 2016; paper eq. 5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from trainables.methods.base import Method, StepOutput, check_params
from trainables.registry import METHODS
from trainables.sprout import soft_cross_entropy, uniform_smooth


@dataclass
class NaturalParams:
    pass


class Natural(Method):
    name = "natural"
    Params = NaturalParams
    selection_metric = "val/clean_acc"

    def __init__(self, params: NaturalParams | None = None, **_: object) -> None:
        self.params = params or NaturalParams()

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        logits = model(x)
        return StepOutput(F.cross_entropy(logits.float(), y), logits, y)


@dataclass
class LabelSmoothingParams:
    alpha: float = 0.1

    def __post_init__(self) -> None:
        check_params("label_smoothing", self, {"alpha": ("unit", None)})


class LabelSmoothing(Method):
    name = "label_smoothing"
    Params = LabelSmoothingParams
    selection_metric = "val/clean_acc"

    def __init__(self, params: LabelSmoothingParams | None = None, *, num_classes: int, **_: object) -> None:
        self.params = params or LabelSmoothingParams()
        self.num_classes = num_classes

    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        logits = model(x)
        targets = uniform_smooth(F.one_hot(y, self.num_classes).to(logits.dtype), self.params.alpha)
        return StepOutput(soft_cross_entropy(logits, targets), logits, y)


METHODS.register("natural")(Natural)
METHODS.register("label_smoothing")(LabelSmoothing)
