"""A small CNN for 8×8 digits (and other tiny inputs): 2 conv blocks + linear head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from trainables.models.common import Normalized
from trainables.registry import MODELS


@MODELS.register("small_cnn")
def small_cnn(
    num_classes: int = 10,
    in_channels: int = 1,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
    width: int = 32,
    **_: object,
) -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )
    return Normalized(net, mean, std)
