"""Shared fixtures for the attack tests: small digits models trained once per session.

The natural small CNN trains in ~2 s; PGD-AT (ε = 0.1, digits needs a larger ε than
CIFAR's 8/255 because its pixels are multiples of 1/16) in ~6 s on one CPU thread.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from trainables import DATASETS, MODELS
from trainables.loop import OptimConfig, fit
from trainables.methods import build_method

DIGITS_EPS = 0.1  # a moderate ε for 8×8 digits (8/255 would barely change a pixel level)


def train_digits(method: str, params: dict | None = None, *, epochs: int = 6, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = MODELS["small_cnn"](num_classes=10, in_channels=1, mean=(0.305,), std=(0.375,))
    m = build_method(method, params or {}, num_classes=10, lr=0.05, seed=seed)
    fit(model, m, DATASETS["digits"](split="train", seed=seed), None, epochs=epochs, batch_size=64,
        optim=OptimConfig(lr=0.05), seed=seed)
    return model.eval()


class RoundQuantizer(nn.Module):
    """A non-differentiable input quantiser: round(x·levels)/levels has zero gradient everywhere,
    so it masks the gradients of the model behind it without making it any more robust."""

    def __init__(self, levels: int = 4) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        return torch.round(x * self.levels) / self.levels


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_test() -> tuple[Tensor, Tensor]:
    return DATASETS["digits"](split="test").tensors()


@pytest.fixture(scope="session")
def natural_model() -> nn.Module:
    return train_digits("natural")


@pytest.fixture(scope="session")
def natural_model_b() -> nn.Module:
    """A second natural model (another seed): a transfer source for the natural model."""
    return train_digits("natural", seed=1)


@pytest.fixture(scope="session")
def pgd_at_model() -> nn.Module:
    return train_digits("pgd_at", {"eps": DIGITS_EPS, "step_size": DIGITS_EPS / 4, "steps": 7}, epochs=4)


@pytest.fixture(scope="session")
def masked_model(natural_model: nn.Module) -> nn.Module:
    return nn.Sequential(RoundQuantizer(), natural_model).eval()
