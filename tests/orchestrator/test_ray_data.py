"""Ray Data input from prepare-data shards: decode/augment (pure) and streaming with real Ray."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from orchestrator.prepare_data import prepare_imagenet  # noqa: E402
from orchestrator.ray_data import (  # noqa: E402
    check_cpu_budget,
    decode_and_augment,
    imagenet_parquet_datasets,
    imagenet_parquet_info,
    in_val_split,
    iter_worker_batches,
    read_manifest,
    row_id,
)
from tests.orchestrator.imagenet_fixture import CLASSES, jpeg_bytes, make_imagenet  # noqa: E402
from trainables.data.base import DataError  # noqa: E402
from trainables.data.imagenet import imagenet_transform  # noqa: E402

SIZE = 64  # small crops keep the Ray tests light on 2 cores; the code path is the 224 one
SEED, VAL_FRACTION = 3, 0.25


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_imagenet(root / "src")
    prepare_imagenet(root / "src", str(root / "shards"), shard_size_mb=0.012, progress=False)
    return root / "shards"


def shard_rows(shards: Path, split: str) -> dict[int, int]:
    """row id → label of every row in the split's shards."""
    out = {}
    for f in sorted((shards / split).glob("shard-*.parquet")):
        for r in pq.read_table(f, columns=["path", "label"]).to_pylist():
            out[row_id(r["path"])] = r["label"]
    return out


def batch_of(images: list[bytes], paths: list[str] | None = None) -> dict:
    b = {"image": np.array(images, dtype=object), "label": np.arange(len(images), dtype=np.int32)}
    if paths is not None:
        b["path"] = np.array(paths, dtype=object)
    return b


# ----------------------------------------------------------------------------- without Ray


def test_eval_transform_matches_torchvision_resize_and_center_crop():
    for w, h in [(70, 50), (40, 90), (256, 256)]:
        data = jpeg_bytes(w, h, seed=w)
        out = decode_and_augment(batch_of([data]), train=False, image_size=SIZE)
        assert out["image"].shape == (1, 3, SIZE, SIZE) and out["image"].dtype == np.uint8
        ref = imagenet_transform(False, SIZE)(Image.open(io.BytesIO(data)).convert("RGB")).numpy() * 255
        # same pixels up to rounding and JPEG draft decoding (~1 level); one pixel off is ~10 levels
        assert np.abs(out["image"][0].astype(np.float64) - ref).mean() < 2.0


def test_train_augmentation_is_seeded_per_row_and_random_without_seed():
    images = [jpeg_bytes(120, 80, seed=i) for i in range(4)]
    paths = [f"train/c/{i}.JPEG" for i in range(4)]
    whole = decode_and_augment(batch_of(images, paths), train=True, image_size=SIZE, seed=7)
    split = [decode_and_augment(batch_of(images[a:b], paths[a:b]), True, SIZE, seed=7) for a, b in [(0, 1), (1, 4)]]
    assert np.array_equal(whole["image"], np.concatenate([s["image"] for s in split]))  # batching-independent
    assert np.array_equal(whole["id"], [row_id(p) for p in paths]) and whole["label"].dtype == np.int64
    other = decode_and_augment(batch_of(images, paths), train=True, image_size=SIZE, seed=8)
    assert not np.array_equal(whole["image"], other["image"])
    fresh = [decode_and_augment(batch_of(images), train=True, image_size=SIZE)["image"] for _ in range(2)]
    assert not np.array_equal(*fresh)
    center = decode_and_augment(batch_of(images), train=False, image_size=SIZE)["image"]
    assert not np.array_equal(whole["image"], center)


def test_decode_handles_grayscale_cmyk_png_and_rejects_garbage_by_path():
    png = io.BytesIO()
    Image.new("RGBA", (50, 40), (10, 200, 30, 128)).save(png, "PNG")
    images = [jpeg_bytes(60, 40, 1, "L"), jpeg_bytes(60, 40, 2, "CMYK"), png.getvalue()]
    out = decode_and_augment(batch_of(images), train=True, image_size=SIZE, seed=0)
    assert out["image"].shape == (3, 3, SIZE, SIZE)
    with pytest.raises(DataError, match="train/x/broken.JPEG"):
        decode_and_augment(batch_of([b"not an image"], ["train/x/broken.JPEG"]), train=False, image_size=SIZE)


def test_val_split_is_a_deterministic_seeded_hash():
    paths = [f"train/c{i % 5}/{i}.JPEG" for i in range(4000)]
    mask = in_val_split(paths, seed=1, val_fraction=0.1)
    assert np.array_equal(mask, in_val_split(list(reversed(paths)), 1, 0.1)[::-1])
    assert 300 < mask.sum() < 500
    assert not np.array_equal(mask, in_val_split(paths, seed=2, val_fraction=0.1))
    assert not in_val_split(paths, 1, 0.0).any()
    with pytest.raises(ValueError, match="val_fraction"):
        in_val_split(paths, 1, 1.0)


def test_unfinished_or_missing_shards_are_clear_errors(tmp_path, shards):
    with pytest.raises(DataError, match="prepare-data"):
        read_manifest(str(tmp_path))
    copy = tmp_path / "copy"
    copy.mkdir()
    manifest = json.loads((shards / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"complete": False}))
    with pytest.raises(DataError, match="has not finished"):
        read_manifest(str(copy))
    info = imagenet_parquet_info(str(shards), image_size=SIZE)
    assert info.num_classes == 3 and info.class_names == CLASSES and info.image_size == SIZE


def test_cpu_budget_refuses_plans_that_leave_no_cpu_to_ray_data():
    assert check_cpu_budget(2, 2, 0.5) == 1.0
    assert check_cpu_budget(16, 1, 1) == 15
    with pytest.raises(ValueError, match=r"cpus_per_worker <= 0\.88"):
        check_cpu_budget(2, 2, 1)


# ----------------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("ray")
    import ray
    import ray.data

    # address="local": our own 2-CPU instance even if a `ray start` cluster runs on this machine
    ray.shutdown()  # an instance left by earlier tests in this session
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_streamed_batches_have_the_right_shapes_labels_and_splits(ray_local, shards):
    ds = imagenet_parquet_datasets(str(shards), seed=SEED, val_fraction=VAL_FRACTION, image_size=SIZE)
    pool = shard_rows(shards, "train")
    test_rows = shard_rows(shards, "val")
    seen: dict[str, dict[int, int]] = {}
    for split, d in ds.items():
        seen[split] = {}
        for b in iter_worker_batches(d, batch_size=4, device="cpu", channels_last=True):
            x, y = b["image"], b["label"]
            assert x.dtype == torch.float32 and x.shape[1:] == (3, SIZE, SIZE) and x.shape[0] <= 4
            assert x.is_contiguous(memory_format=torch.channels_last)
            assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05
            assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
            for i, label in zip(b["id"].tolist(), y.tolist()):
                assert i not in seen[split]
                seen[split][i] = label
    ids = list(pool)
    paths = {row_id(p): p for p in _paths(shards, "train")}
    held = {i for i, m in zip(ids, in_val_split([paths[i] for i in ids], SEED, VAL_FRACTION)) if m}
    assert held and len(held) < len(pool)  # the seed gives a non-trivial split of the 12 images
    assert set(seen["val"]) == held and set(seen["train"]) == set(pool) - held
    assert seen["test"] == test_rows
    for split in ("train", "val"):
        assert all(pool[i] == y for i, y in seen[split].items())


def _paths(shards: Path, split: str) -> list[str]:
    return [p for f in sorted((shards / split).glob("*.parquet")) for p in pq.read_table(f, columns=["path"])["path"].to_pylist()]


@pytest.mark.ray
def test_equal_streaming_split_gives_two_workers_disjoint_equal_shares(ray_local, shards):
    ds = imagenet_parquet_datasets(str(shards), seed=SEED, val_fraction=VAL_FRACTION, image_size=SIZE,
                                   split_names=("train",))["train"]
    n_train = len(shard_rows(shards, "train")) - int(
        in_val_split(_paths(shards, "train"), SEED, VAL_FRACTION).sum()
    )
    # what ray.train.get_dataset_shard hands each of 2 workers
    iterators = ds.streaming_split(2, equal=True)
    got: list[list[int]] = [[], []]

    def consume(k: int) -> None:  # the shares are produced together, so both consume at once
        for b in iter_worker_batches(iterators[k], batch_size=2, device="cpu"):
            got[k] += b["id"].tolist()

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert len(got[0]) == len(got[1]) == n_train // 2
    assert not set(got[0]) & set(got[1])
