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


@DATASETS.register("digits")
def digits(root: str | None = None, split: str = "train", seed: int = 0, val_fraction: float = 0.1, **_: object):
    check_split(split)
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    pool, test = holdout_indices(len(labels), TEST_FRACTION, _TEST_SPLIT_SEED)
    if split == "test":
        idx = test
    else:
        idx = pool[select(split, len(pool), val_fraction, seed)]
    # Mean/std of the digits training pool, rounded (0..16 intensities scaled to [0,1]).
    info = DataInfo(10, 1, 8, (0.305,), (0.375,), tuple(str(i) for i in range(10)))
    return TensorImageDataset(images[idx], labels[idx], info)
