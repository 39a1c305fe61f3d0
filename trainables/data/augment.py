"""Training-set augmentation applied to a batch, identically for every method (SPEC §6).

``standard`` is the CIFAR recipe of every reference implementation (Madry et al., TRADES,
fast_adversarial, the SPROUT authors' code): ``RandomCrop(32, padding=4)`` (zero padding) and
``RandomHorizontalFlip()``, drawn per example. It runs on the batch where it lives (one
gather, no per-image Python), with its randomness from an injectable generator: the training
loop seeds one from (seed, epoch, rank), so an epoch, and therefore a resumed run, is exactly
replayable. Validation and test data are never augmented (only the training loop calls this).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Augment = Callable[[Tensor, torch.Generator | None], Tensor]


def random_crop_flip(
    x: Tensor,
    generator: torch.Generator | None = None,
    *,
    padding: int = 4,
    offsets: Tensor | None = None,
    flips: Tensor | None = None,
) -> Tensor:
    """Per-example random crop of the zero-padded image (same size) and horizontal flip.

    ``offsets``: N×2 (dy, dx) in [0, 2·padding]; ``flips``: N booleans. Drawn from
    ``generator`` (on its device, CPU by default) when not given.
    """
    if x.ndim != 4:
        raise ValueError(f"random_crop_flip needs N×C×H×W images, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    where = generator.device if generator is not None else "cpu"
    if offsets is None:
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=where)
    if flips is None:
        flips = torch.rand(n, generator=generator, device=where) < 0.5
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    rows = (offsets[:, 0, None] + torch.arange(h, device=x.device))[:, :, None]  # N×H×1
    cols = (offsets[:, 1, None] + torch.arange(w, device=x.device))[:, None, :]  # N×1×W
    cols = torch.where(flips[:, None, None], cols.flip(-1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # advanced indexing on dims 0, 2, 3 → N×H×W×C; back to N×C×H×W
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def no_augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    return x


# data.augment → the batch transform the training loop applies ("imagenet": its own pipeline
# already crops and flips in the dataset, so nothing more here)
AUGMENTATIONS: dict[str, Augment] = {"standard": random_crop_flip, "none": no_augment, "imagenet": no_augment}


def build_augment(name: str) -> Augment | None:
    """The training-batch transform for ``data.augment`` (None when it does nothing)."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"data.augment must be one of {sorted(AUGMENTATIONS)}, got {name!r}")
    fn = AUGMENTATIONS[name]
    return None if fn is no_augment else fn
