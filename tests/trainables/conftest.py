"""Shared settings for the training-core tests: one CPU thread (the machine is a shared
2-core box) and a small digits batch that many tests train or attack on."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from trainables import DATASETS, MODELS


@pytest.fixture(autouse=True)
def _torch_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_train() -> tuple[Tensor, Tensor]:
    return DATASETS["digits"](split="train", seed=0).tensors()


@pytest.fixture
def digits_batch(digits_train) -> tuple[Tensor, Tensor]:
    x, y = digits_train
    return x[:64].clone(), y[:64].clone()


def digits_cnn(seed: int = 0, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS["small_cnn"](num_classes=10, in_channels=1, mean=(0.305,), std=(0.375,), width=width)


@pytest.fixture
def make_cnn():
    """Factory for the digits small CNN (seeded), so tests can build several."""
    return digits_cnn


@pytest.fixture
def cnn() -> nn.Module:
    return digits_cnn()
