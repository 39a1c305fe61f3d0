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


def _load_pickle(path: Path) -> dict:
    """The batch dict with str keys: the official files are Python 2 pickles (str keys under
    ``encoding="latin1"``); files re-saved from Python 3 often carry bytes keys (b"data")."""
    with path.open("rb") as f:
        d = pickle.load(f, encoding="latin1")  # noqa: S301 - the dataset's own format
    if not isinstance(d, dict):
        raise TypeError(f"expected a dict, got {type(d).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"CIFAR-10 file missing: {path}; expected layout {LAYOUT}")
    try:
        d = _load_pickle(path)
        raw = np.asarray(d["data"])
        if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != 3 * 32 * 32:
            raise ValueError(f"'data' must be uint8 N×3072, got {raw.dtype} {raw.shape}")
        data = raw.reshape(-1, 3, 32, 32)
        labels = np.asarray(d["labels"], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt file
        raise DataError(
            f"CIFAR-10 file {path} is corrupt or not a CIFAR-10 batch ({type(e).__name__}: {e}); "
            f"expected a pickled dict with 'data' (uint8 N×3072) and 'labels' (N ints in 0..9), in {LAYOUT}"
        ) from None
    if labels.ndim != 1 or len(labels) != len(data) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(
            f"CIFAR-10 file {path} has {len(data)} images but labels of shape {labels.shape} "
            f"(expected {len(data)} labels in 0..9); expected layout {LAYOUT}"
        )
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
    if not base.is_dir() and (Path(root).expanduser() / TRAIN_FILES[0]).is_file():
        base = Path(root).expanduser()  # root is the cifar-10-batches-py folder itself
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
            raw_names = _load_pickle(meta)["label_names"]
            decoded = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in raw_names)
            if len(decoded) == 10:
                names = decoded
        except Exception:  # noqa: BLE001 - names are cosmetic; keep the defaults
            pass
    info = DataInfo(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), names)
    return TensorImageDataset(torch.from_numpy(data.copy()), torch.from_numpy(labels), info)
