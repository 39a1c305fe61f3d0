"""Invariance tests (the paper's Table 5): rotation 10°, brightness ×1.5, contrast ×2, grayscale.

Transforms are torchvision's functional ones on [0, 1] float batches (N×C×H×W):
- rotation: ``rotate`` by +10° (counter-clockwise) about the centre, nearest neighbour
  (torchvision's default), out-of-image pixels filled with 0;
- brightness: ``adjust_brightness(x, 1.5)`` = clamp(1.5·x, 0, 1);
- contrast: ``adjust_contrast(x, 2)`` = clamp(2·x − m, 0, 1), m the image's mean grey level;
- gray: the mean of the RGB channels ("average all RGB pixel values"), repeated on every
  channel so the model's input shape is unchanged (identity for 1-channel images).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from trainables.registry import ATTACKS

INVARIANCE_NAMES: tuple[str, ...] = ("rotation", "brightness", "contrast", "gray")


def _tf():  # noqa: ANN202  (imported lazily: torchvision is slow to import)
    import torchvision.transforms.v2.functional as TF

    return TF


def rotation(x: Tensor, degrees: float = 10.0, bilinear: bool = False) -> Tensor:
    TF = _tf()
    mode = TF.InterpolationMode.BILINEAR if bilinear else TF.InterpolationMode.NEAREST
    return TF.rotate(x, float(degrees), interpolation=mode, fill=0.0).clamp(0.0, 1.0)


def brightness(x: Tensor, factor: float = 1.5) -> Tensor:
    return _tf().adjust_brightness(x, float(factor))


def contrast(x: Tensor, factor: float = 2.0) -> Tensor:
    return _tf().adjust_contrast(x, float(factor))


def gray(x: Tensor) -> Tensor:
    return x.mean(dim=1, keepdim=True).expand_as(x).contiguous()


TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "rotation": rotation,
    "brightness": brightness,
    "contrast": contrast,
    "gray": gray,
}


def invariance_correct(model: nn.Module, x: Tensor, y: Tensor, names: tuple[str, ...] = INVARIANCE_NAMES) -> dict[str, int]:
    """Correct counts of ``model`` on each transformed batch (eval mode, caller's mode restored)."""
    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown invariance transform(s) {unknown}; expected some of {list(INVARIANCE_NAMES)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {n: int((model(TRANSFORMS[n](x)).argmax(1) == y).sum()) for n in names}
    finally:
        model.train(was_training)


@ATTACKS.register("invariance")
def invariance_attack(transform: str = "rotation"):
    """An invariance transform as a closure (model, x, y) → transformed x (model and labels unused)."""
    if transform not in TRANSFORMS:
        raise ValueError(f"invariance transform must be one of {list(INVARIANCE_NAMES)}, got {transform!r}")
    fn = TRANSFORMS[transform]

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return fn(x)

    return attack
