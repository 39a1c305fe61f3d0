"""CIFAR-10 from torchvision's on-disk files (``<root>/cifar-10-batches-py``, python pickles).

Read directly (torchvision's reader insists on the official checksums); ``download=True``
asks torchvision to fetch the files first. The validation split is held out from the
50,000 training images with the run's seed.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from trainables.data.base import DataError, DataInfo, TensorImageDataset, check_split, select
from trainables.registry import DATASETS

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
LAYOUT = "<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (CIFAR-10 python version)"


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"CIFAR-10 file missing: {path}; expected layout {LAYOUT}")
    try:
        with path.open("rb") as f:
            d = pickle.load(f, encoding="latin1")  # noqa: S301 - the dataset's own format
        data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt file
        raise DataError(f"CIFAR-10 file {path} is corrupt or not a CIFAR-10 batch ({type(e).__name__}: {e})") from None
    if len(labels) != len(data) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"CIFAR-10 file {path} has {len(data)} images but {len(labels)} labels in 0..9")
    return data, labels


@DATASETS.register("cifar10")
def cifar10(
    root: str | None = None,
    split: str = "train",
    seed: int = 0,
    val_fraction: float = 0.02,
    download: bool = False,
    **_: object,
):
    check_split(split)
    if root is None:
        raise DataError(f"data.root is required for cifar10; expected {LAYOUT}")
    base = Path(root).expanduser() / "cifar-10-batches-py"
    if download and not base.is_dir():
        import torchvision

        torchvision.datasets.CIFAR10(str(Path(root).expanduser()), train=True, download=True)
    if not base.is_dir():
        raise DataError(f"CIFAR-10 not found at {base}; expected {LAYOUT} (or set data.download: true)")
    files = TEST_FILES if split == "test" else TRAIN_FILES
    parts = [_read_batch(base / f) for f in files]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if split != "test":
        idx = select(split, len(labels), val_fraction, seed)
        data, labels = data[idx], labels[idx]
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    meta = base / "batches.meta"
    if meta.is_file():
        try:
            with meta.open("rb") as f:
                names = tuple(pickle.load(f, encoding="latin1")["label_names"])  # noqa: S301
        except Exception:  # noqa: BLE001 - names are cosmetic; keep the defaults
            pass
    info = DataInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), names)
    return TensorImageDataset(torch.from_numpy(data.copy()), torch.from_numpy(labels), info)
