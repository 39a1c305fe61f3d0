"""Residual networks used by the paper and its baselines.

- ``wrn``: WideResNet(depth, widen) (Zagoruyko & Komodakis 2016); WRN-34-10 is the
  TRADES/Madry CIFAR model, and widen = 1..10 at depth 34 is the paper's Fig. 3 width sweep.
- ``preact_resnet18``: PreAct-ResNet-18 (He et al. 2016), the fast-AT (Wong et al.) model.
- ``resnet50`` / ``resnet152``: torchvision's ImageNet ResNets (the paper's Table 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from trainables.models.common import Normalized
from trainables.registry import MODELS

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016), shared by WRN and PreAct-ResNet-18."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        short = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        return self.conv2(F.relu(self.bn2(o))) + short


class WideResNet(nn.Module):
    def __init__(self, depth: int = 34, widen: int = 10, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"model.depth must be 6n+4 (e.g. 16, 28, 34), got {depth}")
        if depth < 10 or widen < 1:
            raise ValueError(f"model.depth must be >= 10 and model.widen >= 1, got depth={depth}, widen={widen}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(_PreActBlock(cin, w, (1 if i == 0 else 2) if j == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(o, 1).flatten(1))


@MODELS.register("wrn")
def wrn(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
    depth: int = 34,
    widen: int = 10,
    **_: object,
) -> nn.Module:
    return Normalized(WideResNet(depth, widen, num_classes, in_channels), mean, std)


@MODELS.register("preact_resnet18")
def preact_resnet18(
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] = CIFAR_MEAN,
    std: Sequence[float] = CIFAR_STD,
    **_: object,
) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)]
    cin = 64
    for w, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [_PreActBlock(cin, w, stride), _PreActBlock(w, w, 1)]
        cin = w
    layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return Normalized(nn.Sequential(*layers), mean, std)


def _torchvision_resnet(arch: str):
    def factory(
        num_classes: int = 1000,
        in_channels: int = 3,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        zero_init_residual: bool = True,
        **_: object,
    ) -> nn.Module:
        if in_channels != 3:
            raise ValueError(f"model {arch} needs 3 input channels, got data with {in_channels}")
        # imported here: torchvision.models pulls in torch._dynamo (~1-2 s per process), and every
        # Ray worker imports this module whether or not it builds an ImageNet ResNet
        import torchvision.models

        # weights=None: nothing is downloaded; start from a checkpoint with train.init_from.
        net = getattr(torchvision.models, arch)(
            weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual
        )
        return Normalized(net, mean, std)

    return factory


MODELS.register("resnet50")(_torchvision_resnet("resnet50"))
MODELS.register("resnet152")(_torchvision_resnet("resnet152"))
