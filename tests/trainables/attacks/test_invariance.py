"""Invariance transforms (paper Table 5) against hand-computed results on small known images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainables import ATTACKS
from trainables.attacks.invariance import INVARIANCE_NAMES, brightness, contrast, gray, invariance_correct, rotation


def test_brightness_scales_by_1_5_and_clips():
    x = torch.tensor([[[[0.0, 0.2], [0.6, 0.8]]]])
    assert torch.allclose(brightness(x), torch.tensor([[[[0.0, 0.3], [0.9, 1.0]]]]))


def test_contrast_doubles_distance_from_the_mean_grey_level():
    x = torch.tensor([[[[0.25, 0.75], [0.4, 0.6]]]])  # mean 0.5
    assert torch.allclose(contrast(x), torch.tensor([[[[0.0, 1.0], [0.3, 0.7]]]]))
    # RGB: the mean is of the ITU-R 601 grey image (torchvision's weights sum to 0.9999), here ≈ 0.5
    rgb = torch.full((1, 3, 2, 2), 0.5)
    rgb[..., 0, 0] = 0.75
    rgb[..., 1, 1] = 0.25
    assert torch.allclose(contrast(rgb), torch.tensor([[[1.0, 0.5], [0.5, 0.0]]]).expand(1, 3, 2, 2), atol=1e-3)


def test_gray_is_the_mean_of_rgb_kept_at_three_channels():
    x = torch.zeros(1, 3, 1, 2)
    x[0, :, 0, 0] = torch.tensor([0.3, 0.6, 0.9])
    x[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.5])
    g = gray(x)
    assert g.shape == x.shape
    assert torch.allclose(g[0, :, 0, 0], torch.full((3,), 0.6))
    assert torch.allclose(g[0, :, 0, 1], torch.full((3,), 0.5))
    one = torch.rand(2, 1, 3, 3)
    assert torch.equal(gray(one), one)


def test_rotation_by_90_degrees_is_rot90_and_centre_is_fixed_at_10():
    x = torch.arange(9, dtype=torch.float32).reshape(1, 1, 3, 3) / 9
    assert torch.allclose(rotation(x, 90), torch.rot90(x, 1, (2, 3)))
    dot = torch.zeros(1, 1, 5, 5)
    dot[0, 0, 2, 2] = 1.0
    assert torch.equal(rotation(dot), dot)  # 10° about the centre keeps the centre pixel
    # a corner pixel leaves its place under 10° (nearest neighbour) and the area outside is 0-filled
    corner = torch.zeros(1, 1, 9, 9)
    corner[0, 0, 0, 0] = 1.0
    assert rotation(corner)[0, 0, 0, 0] == 0.0


def test_invariance_counts_and_registry():
    class Brightest(nn.Module):  # predicts class 1 iff the mean pixel exceeds 0.5
        def forward(self, x):
            m = x.flatten(1).mean(1)
            return torch.stack([0.5 - m, m - 0.5], 1)

    x = torch.full((4, 1, 2, 2), 0.4)
    y = torch.zeros(4, dtype=torch.long)
    counts = invariance_correct(Brightest(), x, y)
    assert set(counts) == set(INVARIANCE_NAMES)
    assert counts["brightness"] == 0  # 0.4 × 1.5 = 0.6 > 0.5
    assert counts["gray"] == 4 and counts["contrast"] == 4
    assert torch.allclose(ATTACKS["invariance"](transform="brightness")(None, x, y), torch.full_like(x, 0.6))
    with pytest.raises(ValueError, match="invariance"):
        ATTACKS["invariance"](transform="blur")
