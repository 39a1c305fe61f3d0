"""VGG-16 with BatchNorm, CIFAR variant (Simonyan & Zisserman 2015; the paper's Table 2 model)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from trainables.models.common import Normalized
from trainables.registry import MODELS

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


@MODELS.register("vgg16")
def vgg16(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
    std: Sequence[float] = (0.2470, 0.2435, 0.2616),
    **_: object,
) -> nn.Module:
    layers: list[nn.Module] = []
    c = in_channels
    for v in VGG16:
        if v == "M":
            # ceil_mode only matters below 32×32 (a 1×1 map stays 1×1, so 8×8 digits work);
            # at 32×32 every map is even and this is the standard CIFAR VGG-16.
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            c = int(v)
    # All five max-pools, then 1×1 → 512 features, as the CIFAR VGG-16 (32×32 → 1×1); the
    # adaptive average keeps the head valid for larger inputs.
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))
    return Normalized(net, mean, std)
