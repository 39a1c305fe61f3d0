"""Models: every registered model builds, starts with its own normalisation and maps [0,1]
images to N×K logits; WideResNet's depth/width follow the paper's models."""

from __future__ import annotations

import pytest
import torch

from trainables import MODELS
from trainables.models import Normalize

# Small but valid inputs per model; a model registered later gets the generic CIFAR-shaped case.
CASES = {
    "small_cnn": dict(kwargs=dict(in_channels=1, mean=(0.3,), std=(0.4,)), shape=(2, 1, 8, 8)),
    "wrn": dict(kwargs=dict(depth=16, widen=1), shape=(2, 3, 32, 32)),
    "resnet50": dict(kwargs={}, shape=(1, 3, 64, 64)),
    "resnet152": dict(kwargs={}, shape=(1, 3, 64, 64)),
}
GENERIC = dict(kwargs={}, shape=(2, 3, 32, 32))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_and_maps_unit_images_to_logits(name):
    case = CASES.get(name, GENERIC)
    torch.manual_seed(0)
    model = MODELS[name](num_classes=7, **case["kwargs"]).eval()
    assert isinstance(model.normalize, Normalize)  # its own normalisation: inputs stay in [0, 1]
    x = torch.rand(case["shape"])
    with torch.no_grad():
        out = model(x)
    assert out.shape == (case["shape"][0], 7) and torch.isfinite(out).all()
    # the normalisation is part of the model: shifting it changes the output
    with torch.no_grad():
        model.normalize.mean.add_(0.5)
        assert not torch.allclose(model(x), out)


@pytest.mark.parametrize("name", ["small_cnn", "vgg16", "wrn", "preact_resnet18"])
def test_cifar_models_train_a_step_and_also_take_8x8_digits(name):
    kwargs = {"depth": 10, "widen": 1} if name == "wrn" else {}
    torch.manual_seed(0)
    model = MODELS[name](num_classes=10, in_channels=1, mean=(0.3,), std=(0.4,), **kwargs).train()
    x, y = torch.rand(4, 1, 8, 8), torch.arange(4)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_wide_resnet_depth_and_width():
    small = MODELS["wrn"](depth=16, widen=1)
    assert small.net.fc.in_features == 64
    assert len(small.net.blocks) == 3 * 2  # (16 − 4) / 6 = 2 blocks per stage
    wide = MODELS["wrn"](depth=16, widen=4)
    assert wide.net.fc.in_features == 256
    with pytest.raises(ValueError, match="model.depth"):
        MODELS["wrn"](depth=15)
    with pytest.raises(ValueError, match="model.widen"):
        MODELS["wrn"](depth=16, widen=0)


def test_wrn_34_10_has_the_trades_parameter_count():
    """WRN-34-10 as in TRADES / Madry et al.: 46.16 M parameters for 10 classes."""
    model = MODELS["wrn"](depth=34, widen=10)
    assert sum(p.numel() for p in model.parameters()) == 46_160_474


def test_vgg16_is_the_cifar_variant():
    model = MODELS["vgg16"]()
    assert sum(p.numel() for p in model.parameters()) == 14_728_266
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13 and sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 5


def test_torchvision_resnets_need_three_channels():
    with pytest.raises(ValueError, match="3 input channels"):
        MODELS["resnet50"](in_channels=1)


def test_mismatched_normalisation_channels_are_refused():
    model = MODELS["vgg16"](in_channels=1)  # CIFAR's 3-channel mean/std with 1-channel input
    with pytest.raises(ValueError, match="mean/std"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="std > 0"):
        MODELS["small_cnn"](mean=(0.5,), std=(0.0,))
