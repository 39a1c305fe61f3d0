"""Dataset helpers: in-memory image datasets with metadata, and seeded train/val splits.

Every dataset yields ``(image, label)`` with float images in [0, 1], C×H×W. Model
selection uses ``val``, held out from the training data by a seeded split; ``test`` is
never used for selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Missing or malformed data: the message names the path and the expected layout."""


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]


class TensorImageDataset(Dataset):
    """Images held as uint8 (N×C×H×W) or float in [0,1]; returned as float in [0,1]."""

    def __init__(self, images: Tensor, labels: Tensor, info: DataInfo) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise DataError(f"expected N×C×H×W images and N labels, got {tuple(images.shape)} and {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.info = info

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = self.images[i]
        img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
        return img, int(self.labels[i])

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All images (float in [0,1]) and labels at once, for fast in-memory loops."""
        imgs = self.images.float() / 255.0 if self.images.dtype == torch.uint8 else self.images.float()
        return imgs, self.labels


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of range(n) into (kept, held_out) with round(fraction·n) held out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(fraction * n))
    return np.sort(perm[k:]), np.sort(perm[:k])


def select(split: str, n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Indices of ``split`` ('train' or 'val') within a training pool of size n."""
    train_idx, val_idx = holdout_indices(n, val_fraction, seed)
    return train_idx if split == "train" else val_idx


def mean_std(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def dataset_info(ds: Dataset) -> DataInfo:
    """The DataInfo of a dataset built by DATASETS (looks through Subset wrappers)."""
    while not hasattr(ds, "info") and hasattr(ds, "dataset"):
        ds = ds.dataset  # type: ignore[attr-defined]
    return ds.info  # type: ignore[attr-defined]
