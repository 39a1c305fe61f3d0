"""Streaming ImageNet input with Ray Data from the Parquet shards of ``sprout prepare-data``.

Splits: ``train`` and ``val`` both read the ``train/`` shards and keep a row by a seeded
hash of its ``path`` (``in_val_split``), so the split is deterministic, needs no shuffle
and no global index, and is the same on every node; ``val`` holds about ``val_fraction``
of the images (a hash, not an exact count). ``test`` is the official validation set (the
``val/`` shards). This mirrors ``DATASETS["imagenet"]``: val is held out from train with
the run's seed and test is never used for selection.

Decoding and augmentation run in Ray Data CPU tasks (``map_batches``): train gets
RandomResizedCrop(224, scale 0.08–1, ratio 3/4–4/3) + horizontal flip, val/test get resize
256 + centre-crop 224, as ``trainables.data.imagenet.imagenet_transform``. Batches leave
the tasks as **uint8** N×3×224×224 (a quarter of float32's bytes through the object store
and the host-to-device copy); ``iter_worker_batches`` turns them into float32 in [0, 1] on
the training device.

CPU resources (why it does not deadlock): Ray Data tasks only start when a CPU share is
free. Each read task asks for ``READ_CPUS`` and each decode task for ``DECODE_CPUS``
(0.25 by default, so four fit into one core). Train workers must leave at least that much
unreserved: on a 2-core machine with 2 workers use ``cpus_per_worker = 0.5`` (1 CPU left for
data tasks), on a 16-core GPU node with one worker per GPU keep ``cpus_per_worker`` at 1 so
the other cores decode. ``check_cpu_budget`` raises a clear error for a plan that would
leave no CPU to Ray Data (which otherwise hangs, retrying every 60 s, instead of failing).

Granularity: Ray Data 2.60 bundles Parquet reads into blocks of up to 128 MB
(``DataContext.target_max_block_size``), and each block is one decode task: full ImageNet
(~140 GB) gives ~1,100 tasks of ~1,100 images per epoch, plenty to keep every core busy;
a dataset under 128 MB decodes in a single task (fine for tests, slow for benchmarks).
Splitting blocks further with ``repartition(target_num_rows_per_block=...)`` was slower
in a try on a loaded 2-core machine (its extra tasks cost more than they parallelise), so
it is not done.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from orchestrator.prepare_data import FORMAT, join, open_destination
from trainables.data.base import DataError, DataInfo
from trainables.models.resnets import IMAGENET_MEAN, IMAGENET_STD

READ_CPUS = 0.25
DECODE_CPUS = 0.25
DECODE_BATCH = 32  # rows per decode_and_augment call: ~5 MB of uint8 224² images out
SPLITS = ("train", "val", "test")
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


# ----------------------------------------------------------------------------- pure functions


def _hash64(text: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.blake2b(f"{salt}\0{text}".encode(), digest_size=8).digest(), "little")


def row_id(path: str) -> int:
    """A stable non-negative int64 id of a row (63 bits of a hash of its path)."""
    return _hash64(path) >> 1


def in_val_split(paths: Sequence[str], seed: int, val_fraction: float) -> np.ndarray:
    """Boolean mask: which training-pool rows the seeded hash split holds out for ``val``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    threshold = val_fraction * 2.0**64
    return np.fromiter((_hash64(str(p), f"val-split/{seed}") < threshold for p in paths), bool, len(paths))


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = SCALE,
    ratio: tuple[float, float] = RATIO,
) -> tuple[int, int, int, int]:
    """(left, top, w, h) as torchvision's RandomResizedCrop.get_params draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height  # fallback: the central crop with the nearest allowed ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, image_size: int) -> tuple[float, float, float, float]:
    """(left, top, w, h) in source pixels of Resize(size·256/224) then CenterCrop(size)."""
    resize = int(image_size * 256 / 224)
    # torchvision's Resize(int) on PIL: the short side becomes `resize`, the long side truncates
    if width <= height:
        rw, rh = resize, int(resize * height / width)
    else:
        rw, rh = int(resize * width / height), resize
    left, top = int(round((rw - image_size) / 2.0)), int(round((rh - image_size) / 2.0))
    sx, sy = width / rw, height / rh
    return left * sx, top * sy, image_size * sx, image_size * sy


def _decode_one(data: bytes, train: bool, image_size: int, rng: np.random.Generator | None) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
        if train:
            left, top, w, h = random_resized_crop_box(width, height, rng)
        else:
            left, top, w, h = center_crop_box(width, height, image_size)
        # JPEG DCT scaling: decode at 1/2, 1/4 or 1/8 size when the crop still has ≥ image_size
        # pixels per side there; large photos then decode several times faster.
        im.draft("RGB", (math.ceil(width * image_size / w), math.ceil(height * image_size / h)))
        fx, fy = im.size[0] / width, im.size[1] / height
        box = (left * fx, top * fy, (left + w) * fx, (top + h) * fy)
        out = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR, box=box)
    arr = np.asarray(out)
    if train and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return arr.transpose(2, 0, 1)


def decode_and_augment(
    batch: dict[str, Any], train: bool, image_size: int = 224, seed: int | None = None
) -> dict[str, np.ndarray]:
    """Decode a batch of encoded images and apply the ImageNet train or eval transform.

    ``batch``: ``image`` (encoded bytes), ``label`` and optionally ``path``. Returns
    ``image`` uint8 N×3×S×S, ``label`` int64 N and, if ``path`` was given, ``id`` int64
    (``row_id``). With ``seed`` set, each row's crop and flip come from a generator seeded
    by (seed, path) (by (seed, position) without paths), so they do not depend on batching;
    ``seed=None`` draws fresh randomness (new crops every epoch). Eval is deterministic.
    """
    images = batch["image"]
    n = len(images)
    paths = batch.get("path")
    shared_rng = np.random.default_rng() if train and seed is None else None
    out = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    for i in range(n):
        key = str(paths[i]) if paths is not None else str(i)
        rng = shared_rng
        if train and seed is not None:
            rng = np.random.default_rng([int(seed) & (2**63 - 1), _hash64(key, "augment")])
        try:
            out[i] = _decode_one(bytes(images[i]), train, image_size, rng)
        except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for undecodable data
            raise DataError(
                f"cannot decode image {key}: {type(e).__name__}: {e}; re-run `sprout prepare-data`, "
                "which verifies every image"
            ) from None
    result = {"image": out, "label": np.asarray(batch["label"], dtype=np.int64).reshape(n)}
    if paths is not None:
        result["id"] = np.fromiter((row_id(str(p)) for p in paths), np.int64, n)
    return result


def _decode_task(
    batch: dict[str, np.ndarray], *, train: bool, image_size: int, augment_seed: int | None,
    split_seed: int, val_fraction: float, keep: str | None,
) -> dict[str, np.ndarray]:
    if keep is not None:
        held_out = in_val_split(batch["path"], split_seed, val_fraction)
        mask = held_out if keep == "val" else ~held_out
        batch = {k: v[mask] for k, v in batch.items()}  # before decoding: never decode dropped rows
    return decode_and_augment(batch, train, image_size, augment_seed)


# ----------------------------------------------------------------------------- shards on disk


def read_manifest(root: str) -> tuple[Any, str, dict[str, Any]]:
    """(pyarrow filesystem, base path, manifest) of a finished ``prepare-data`` output."""
    fs, base = open_destination(root)
    try:
        with fs.open_input_stream(join(base, "manifest.json")) as fh:
            manifest = json.loads(fh.read())
    except FileNotFoundError:
        raise DataError(
            f"no manifest.json under {root}: expected Parquet shards written by "
            f"`sprout prepare-data imagenet SRC {root}`"
        ) from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{join(root, 'manifest.json')} is not a {FORMAT} manifest")
    if not manifest.get("complete"):
        raise DataError(
            f"`sprout prepare-data` has not finished writing {root}; re-run it (it resumes from the "
            "finished shards)"
        )
    return fs, base, manifest


def imagenet_parquet_info(root: str, image_size: int = 224) -> DataInfo:
    """DataInfo (class count and names, normalisation) of a shard folder, from classes.json."""
    fs, base, manifest = read_manifest(root)
    with fs.open_input_stream(join(base, manifest.get("classes_file", "classes.json"))) as fh:
        classes = json.loads(fh.read())["classes"]
    return DataInfo(len(classes), 3, image_size, IMAGENET_MEAN, IMAGENET_STD, tuple(classes))


def check_cpu_budget(
    cluster_cpus: float, num_workers: int, cpus_per_worker: float, decode_cpus: float = DECODE_CPUS
) -> float:
    """CPUs left to Ray Data tasks by the Train workers; raises ValueError if too few to run one."""
    free = cluster_cpus - num_workers * cpus_per_worker
    need = max(decode_cpus, READ_CPUS)
    if free < need - 1e-9:
        most = (cluster_cpus - need) / max(num_workers, 1)
        raise ValueError(
            f"scaling.cpus_per_worker={cpus_per_worker} × {num_workers} workers leaves {free:g} of "
            f"{cluster_cpus:g} CPUs for Ray Data decode tasks, which need {need:g} each; set "
            f"scaling.cpus_per_worker <= {max(most, 0):.2f} (fractions are fine) or add CPUs"
        )
    return free


def imagenet_parquet_datasets(
    root: str,
    *,
    seed: int = 0,
    val_fraction: float = 0.01,
    image_size: int = 224,
    split_names: Sequence[str] = SPLITS,
    augment_seed: int | None = None,
    read_cpus: float = READ_CPUS,
    decode_cpus: float = DECODE_CPUS,
    decode_batch_size: int = DECODE_BATCH,
) -> dict[str, Any]:
    """Ray Datasets of decoded ImageNet splits from prepare-data shards (see module docstring).

    Each dataset yields ``image`` (uint8 N×3×S×S), ``label`` (int64) and ``id`` (int64 row
    id). Pass the dict to ``TorchTrainer(datasets=...)``; Ray Train splits ``train`` across
    workers with ``streaming_split(equal=True)``. ``val`` needs ``val_fraction > 0``.
    """
    import ray.data

    unknown = sorted(set(split_names) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split {unknown[0]!r}; expected some of {list(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if "val" in split_names and not val_fraction > 0:
        raise ValueError("data.val_fraction must be > 0 for a val split (or leave 'val' out of split_names)")
    fs, base, manifest = read_manifest(root)  # once: for full ImageNet it lists 1.3 M files
    out = {}
    for split in split_names:
        source = "val" if split == "test" else "train"
        paths = [join(base, s["path"]) for s in manifest["splits"].get(source, {}).get("shards", [])]
        if not paths:
            raise DataError(f"no {source}/ shards under {root}: the source folder had no {source}/ images")
        ds = ray.data.read_parquet(
            paths, filesystem=fs, num_cpus=read_cpus,
            shuffle="files" if split == "train" else None,  # a new shard order every epoch
        ).select_columns(["image", "label", "path"])  # pushed down into the Parquet scan
        out[split] = ds.map_batches(
            _decode_task,
            batch_format="numpy",
            batch_size=decode_batch_size,
            num_cpus=decode_cpus,
            fn_kwargs={
                "train": split == "train",
                "image_size": image_size,
                "augment_seed": augment_seed,
                "split_seed": seed,
                "val_fraction": val_fraction,
                "keep": None if split == "test" else split,
            },
        )
    return out


def iter_worker_batches(
    shard: Any,
    batch_size: int,
    device: Any = "cpu",
    *,
    channels_last: bool = False,
    drop_last: bool = False,
    local_shuffle_buffer_size: int | None = None,
    local_shuffle_seed: int | None = None,
    prefetch_batches: int = 2,
) -> Iterator[dict[str, Any]]:
    """Batches ``{"image": float32 in [0,1] on device, "label": int64, "id": int64}``.

    ``shard`` is what a Ray Train worker gets from ``ray.train.get_dataset_shard("train")``
    (or any Dataset/DataIterator). Ray moves the uint8 batch to ``device`` on its prefetch
    thread (from pinned memory on CUDA); the float conversion then runs on the device.
    Call it once per epoch; the result feeds ``trainables.loop.train_epoch`` directly.
    """
    import torch

    device = torch.device(device)
    batches = shard.iter_torch_batches(
        batch_size=batch_size,
        device=device,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=local_shuffle_seed,
        prefetch_batches=prefetch_batches,
    )
    for batch in batches:
        x = batch["image"]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = {"image": x, "label": batch["label"].long()}
        if "id" in batch:
            out["id"] = batch["id"]
        yield out
