"""Synthetic images of any shape and class count, for benchmarks and tests.

Each class has a random prototype image; samples are the prototype plus noise, clipped
to [0, 1], so models can learn it. Fully determined by ``seed``.
"""

from __future__ import annotations

import torch

from trainables.data.base import DataInfo, TensorImageDataset, check_split
from trainables.registry import DATASETS

_SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}


@DATASETS.register("synthetic")
def synthetic(
    root: str | None = None,
    split: str = "train",
    seed: int = 0,
    image_size: int = 32,
    channels: int = 3,
    num_classes: int = 10,
    num_samples: int = 512,
    noise: float = 0.15,
    **_: object,
):
    check_split(split)
    for name, v in {"image_size": image_size, "channels": channels, "num_classes": num_classes, "num_samples": num_samples}.items():
        if int(v) < 1:
            raise ValueError(f"data.{name} must be >= 1, got {v}")
    protos = torch.rand(num_classes, channels, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed * 3 + 1 + _SPLIT_OFFSET[split])
    n = num_samples if split == "train" else max(num_samples // 5, num_classes)
    labels = torch.randint(num_classes, (n,), generator=g)
    images = (protos[labels] + noise * torch.randn(n, channels, image_size, image_size, generator=g)).clamp(0, 1)
    info = DataInfo(num_classes, channels, image_size, (0.5,) * channels, (0.25,) * channels,
                    tuple(f"class_{i}" for i in range(num_classes)))
    return TensorImageDataset(images, labels, info)
