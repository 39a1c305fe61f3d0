"""The training-method protocol shared by SPROUT and every baseline.

A method turns (model, batch) into a loss plus what the loop needs to score and log it;
the loop (``trainables.loop``) owns backward and the model optimizer step. Methods hold
their own extra state (SPROUT's β and its ascent optimizer, Free-AT's carried δ), update it
in ``after_step`` from the gradients that the same backward produced, and expose it via
``state_dict`` so checkpoints restore it. No method imports Ray or MLflow, and none moves
data between devices.
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class StepOutput:
    loss: Tensor
    logits: Tensor  # predictions used for train accuracy
    labels: Tensor  # hard labels those predictions are scored against
    metrics: dict[str, float] = field(default_factory=dict)


class Method(abc.ABC):
    """Base class: one optimizer step per minibatch, no extra state."""

    name: ClassVar[str] = "base"
    # the dataclass holding this method's knobs (its config section)
    Params: ClassVar[type]
    # optimizer steps taken on each minibatch (Free-AT replays it m times)
    replays: int = 1
    # the configured epoch count is divided by this (Free-AT: by m, as in Shafahi et al.)
    epoch_divisor: int = 1
    # the validation metric its checkpoints are selected by (train.checkpoint_metric: null)
    selection_metric: ClassVar[str] = "val/pgd_acc"

    @abc.abstractmethod
    def loss(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        """Loss on one minibatch; no side effects on the model or its optimizer."""

    def after_step(self) -> None:
        """Update method state from gradients of the last backward (no-op by default)."""
        return None

    def epoch_metrics(self) -> dict[str, float]:
        return {}

    def set_lr(self, lr: float) -> None:
        """The model's learning rate of this epoch; methods with their own optimizers follow it."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} has no state, got keys {sorted(state)}")

    def to(self, device: torch.device | str) -> Method:
        return self


def check_params(section: str, params: Any, rules: dict[str, tuple[str, Any]]) -> None:
    """Validate dataclass fields: rules name → (kind, bound); errors name ``section.field``.

    Kinds: ``in`` (one of bound), ``unit`` ([0, 1]), ``ge``/``gt`` (≥/> bound), ``eps``
    (a budget in pixel units of [0, 1] images: 0 < v ≤ 1) and ``step`` (a step size inside
    the budget named by bound: 0 < v ≤ that field, or ≤ factor·field for ``(field, factor)``).
    """
    for fname, (kind, bound) in rules.items():
        v = getattr(params, fname)
        if kind == "in":
            ok, expect = v in bound, f"one of {list(bound)}"
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            ok, expect = False, "a number"
        elif kind == "unit":
            ok, expect = 0.0 <= v <= 1.0, "in [0, 1]"
        elif kind == "eps":
            ok, expect = 0.0 < v <= 1.0, "in (0, 1] (pixel units of images in [0, 1])"
        elif kind == "step":
            ref, factor = bound if isinstance(bound, tuple) else (bound, 1.0)
            limit = factor * getattr(params, ref)
            times = "" if factor == 1.0 else f"{factor:g}·"
            ok, expect = 0.0 < v <= limit, f"> 0 and <= {times}{section}.{ref} = {limit:g} (pixel units)"
        elif kind == "ge":
            ok, expect = v >= bound, f">= {bound}"
        else:  # "gt"
            ok, expect = v > bound, f"> {bound}"
        if not ok:
            raise ValueError(f"{section}.{fname} must be {expect}, got {v!r}")


def params_from_dict(cls: type, section: str, values: dict[str, Any] | None) -> Any:
    """Build a params dataclass, rejecting unknown keys with the allowed ones listed."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"{section}.{unknown[0]} is not a known key; expected one of: {', '.join(sorted(fields))}"
        )
    for name, value in values.items():
        values[name] = _coerce(section, name, value, fields[name].type)
    return cls(**values)


def _coerce(section: str, name: str, value: Any, annotation: Any) -> Any:
    """Check a value against its field's simple annotation (bool, int, float, str, X | None).

    An int is accepted for a float (and returned as float); a bool is never a number and a
    string never a number (YAML ``8/255`` is a string): those raise ValueError naming the key.
    """
    ann = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    kinds = {part.strip() for part in ann.split("|")}
    if not kinds <= {"bool", "int", "float", "str", "None"}:
        return value  # a richer annotation: the dataclass's own checks apply
    if value is None and "None" in kinds:
        return value
    if isinstance(value, (bool, np.bool_)):
        if "bool" in kinds:
            return bool(value)
    elif isinstance(value, numbers.Integral):  # int and numpy integers (e.g. from a Tune sampler)
        if "int" in kinds:
            return int(value)
        if "float" in kinds:
            return float(value)
    elif isinstance(value, numbers.Real):
        if "float" in kinds:
            return float(value)
    elif isinstance(value, str) and "str" in kinds:
        return value
    expect = " or ".join("null" if k == "None" else k for k in sorted(kinds))
    raise ValueError(f"{section}.{name} must be {expect}, got {value!r} ({type(value).__name__})")
