"""Datasets: ``DATASETS[name](root=None, split=..., **options)`` → (image in [0,1], label)."""

from trainables.data import cifar10, digits, imagenet, synthetic  # noqa: F401  (register)
from trainables.data.base import DataError, DataInfo, TensorImageDataset, dataset_info

__all__ = ["DataError", "DataInfo", "TensorImageDataset", "dataset_info"]
