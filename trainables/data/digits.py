"""scikit-learn's digits (1,797 real 8×8 grey images, 10 classes): the embedded default.

The test split (20 %) is fixed for every seed, so test numbers are comparable across
runs; the validation split is drawn from the rest with the run's seed.
"""

from __future__ import annotations

import numpy as np
import torch

from trainables.data.base import DataInfo, TensorImageDataset, check_split, holdout_indices, select
from trainables.registry import DATASETS

TEST_FRACTION = 0.2
_TEST_SPLIT_SEED = 20210201


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The (1797, 64) pixel rows and labels of scikit-learn's ``digits.csv.gz``, read as
    ``sklearn.datasets.load_digits`` reads it (same order, same values).

    The file is located without importing scikit-learn: ``import sklearn.datasets`` pulls in
    SciPy and costs seconds in every process that loads digits (the driver, each Train
    worker, each evaluation task), where reading the file takes a fraction of one."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the digits dataset ships with scikit-learn: pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


@DATASETS.register("digits")
def digits(root: str | None = None, split: str = "train", seed: int = 0, val_fraction: float = 0.1, **_: object):
    check_split(split)
    flat, target = load_digits_arrays()
    images = torch.from_numpy((flat.reshape(-1, 8, 8) / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(target.astype(np.int64))
    pool, test = holdout_indices(len(labels), TEST_FRACTION, _TEST_SPLIT_SEED)
    if split == "test":
        idx = test
    else:
        idx = pool[select(split, len(pool), val_fraction, seed)]
    # Mean/std of the digits training pool, rounded (0..16 intensities scaled to [0,1]).
    info = DataInfo(10, 1, 8, (0.305,), (0.375,), tuple(str(i) for i in range(10)))
    return TensorImageDataset(images[idx], labels[idx], info)
