"""Shared model pieces: every model starts with its own normalisation, so it takes [0,1] images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """(x − mean) / std per channel; buffers so they travel with the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not all(float(s) > 0 for s in std):
            raise ValueError(f"model mean/std need one value each per channel and std > 0, got {mean} and {std}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or self.mean.shape[1] not in (1, x.shape[1]):
            # without this, 3-channel statistics silently broadcast a 1-channel image to 3
            raise ValueError(
                f"model input must be N×C×H×W with C = {self.mean.shape[1]} (the model's mean/std), "
                f"got {tuple(x.shape)}; pass model mean/std with one value per input channel"
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class Normalized(nn.Sequential):
    """Normalize followed by the network: ``model(x)`` takes images in [0, 1]."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
