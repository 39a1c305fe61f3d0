"""Datasets: digits splits, synthetic data, CIFAR-10 from its on-disk pickles, ImageNet as an
ImageFolder of real JPEGs, and clear DataErrors for missing or malformed data."""

from __future__ import annotations

import collections
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainables import DATASETS
from trainables.data import DataError, dataset_info
from trainables.data.cifar10 import LAYOUT as CIFAR_LAYOUT
from trainables.data.imagenet import LAYOUT as IMAGENET_LAYOUT


def as_keys(ds) -> collections.Counter:
    x, y = ds.tensors()
    return collections.Counter((bytes(img.numpy().tobytes()), int(lab)) for img, lab in zip(x, y))


# --- digits -------------------------------------------------------------------------------


def test_digits_splits_partition_the_dataset():
    from sklearn.datasets import load_digits

    splits = {s: DATASETS["digits"](split=s, seed=0) for s in ("train", "val", "test")}
    sizes = {s: len(d) for s, d in splits.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == 359 and sizes["val"] > 100
    full = load_digits()
    whole = collections.Counter(
        (bytes((torch.from_numpy(img / 16.0).float().unsqueeze(0)).numpy().tobytes()), int(t))
        for img, t in zip(full.images, full.target)
    )
    union = as_keys(splits["train"]) + as_keys(splits["val"]) + as_keys(splits["test"])
    assert union == whole  # disjoint and complete, as multisets of (image, label)


def test_digits_file_reads_exactly_as_sklearn_loads_it():
    """The splits index into this array by position: same order and values as load_digits."""
    from sklearn.datasets import load_digits

    from trainables.data.digits import load_digits_arrays

    flat, target = load_digits_arrays()
    full = load_digits()
    assert np.array_equal(flat, full.data) and np.array_equal(target, full.target)
    assert np.array_equal(flat.reshape(-1, 8, 8), full.images)


def test_loading_digits_does_not_import_sklearn():
    code = ("import sys; from trainables import DATASETS; DATASETS['digits'](split='val'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_digits_splits_are_deterministic_and_test_is_seed_independent():
    a = DATASETS["digits"](split="val", seed=0).tensors()
    b = DATASETS["digits"](split="val", seed=0).tensors()
    c = DATASETS["digits"](split="val", seed=1).tensors()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    t0 = DATASETS["digits"](split="test", seed=0).tensors()
    t1 = DATASETS["digits"](split="test", seed=7).tensors()
    assert torch.equal(t0[0], t1[0]) and torch.equal(t0[1], t1[1])
    # the test split never leaks into a training pool, whatever the seed
    assert not (as_keys(DATASETS["digits"](split="train", seed=7)) & as_keys(DATASETS["digits"](split="test")))


def test_digits_items_are_float_chw_images_in_the_unit_interval():
    ds = DATASETS["digits"](split="train")
    img, label = ds[0]
    assert img.dtype == torch.float32 and img.shape == (1, 8, 8)
    assert isinstance(label, int) and 0 <= label < 10
    x, y = ds.tensors()
    assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
    assert set(y.tolist()) == set(range(10))
    info = dataset_info(ds)
    assert (info.num_classes, info.channels, info.image_size) == (10, 1, 8)


def test_bad_split_name_is_refused():
    with pytest.raises(ValueError, match="split"):
        DATASETS["digits"](split="training")


# --- synthetic ----------------------------------------------------------------------------


def test_synthetic_has_the_requested_shape_and_is_seeded():
    ds = DATASETS["synthetic"](split="train", seed=3, image_size=12, channels=2, num_classes=4, num_samples=40)
    x, y = ds.tensors()
    assert x.shape == (40, 2, 12, 12) and x.min() >= 0 and x.max() <= 1
    assert set(y.tolist()) <= set(range(4))
    again = DATASETS["synthetic"](split="train", seed=3, image_size=12, channels=2, num_classes=4, num_samples=40)
    assert torch.equal(x, again.tensors()[0])
    test = DATASETS["synthetic"](split="test", seed=3, image_size=12, channels=2, num_classes=4, num_samples=40)
    assert not torch.equal(test.tensors()[0][:8], x[:8])
    with pytest.raises(ValueError, match="data.image_size"):
        DATASETS["synthetic"](image_size=0)


# --- CIFAR-10 on disk -----------------------------------------------------------------------


def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_int(v: int) -> bytes:
    return b"J" + struct.pack("<i", v)


def _py2_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _py2_array(a: np.ndarray) -> bytes:
    """A uint8 ndarray pickled the way Python 2's numpy did (raw data as a byte *str*)."""
    shape = b"(" + b"".join(_py2_int(s) for s in a.shape) + b"t"
    dtype = (_py2_global("numpy", "dtype") + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R"
             + b"(" + _py2_int(3) + _py2_str(b"|") + b"NNN" + _py2_int(-1) + _py2_int(-1) + _py2_int(0) + b"tb")
    return (_py2_global("numpy.core.multiarray", "_reconstruct") + _py2_global("numpy", "ndarray")
            + _py2_int(0) + b"\x85" + _py2_str(b"b") + b"\x87R"
            + b"(" + _py2_int(1) + shape + dtype + b"\x89" + _py2_str(np.ascontiguousarray(a).tobytes()) + b"tb")


def py2_pickle(d: dict) -> bytes:
    """A protocol-2 pickle as Python 2's cPickle wrote the official CIFAR-10 files: str keys
    and values are byte strings (decoded by ``encoding=``), lists of ints, numpy arrays."""
    out = b"\x80\x02}("
    for k, v in d.items():
        out += _py2_str(k.encode())
        if isinstance(v, np.ndarray):
            out += _py2_array(v)
        elif isinstance(v, list):
            out += b"](" + b"".join(_py2_int(e) if isinstance(e, int) else _py2_str(e.encode()) for e in v) + b"e"
        else:
            out += _py2_str(str(v).encode())
    return out + b"u."


NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root, per_batch: int = 6, n_test: int = 8, style: str = "py2"):
    """A tiny CIFAR-10 in the real layout; pixel 0 of image i encodes its global index."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth = {}

    def dump(name, d):
        if style == "py2":
            raw = py2_pickle(d)
        elif style == "bytes-keys":
            raw = pickle.dumps({k.encode(): v for k, v in d.items()}, protocol=2)
        else:
            raw = pickle.dumps(d, protocol=4)
        (base / name).write_bytes(raw)

    start = 0
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        data[:, 0] = np.arange(start, start + n)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        truth[name] = (data, labels)
        dump(name, {"batch_label": f"{name} of 5", "labels": labels, "data": data,
                    "filenames": [f"img_{j}.png" for j in range(start, start + n)]})
        start += n
    dump("batches.meta", {"label_names": NAMES, "num_cases_per_batch": per_batch, "num_vis": 3072})
    return truth


@pytest.mark.parametrize("style", ["py2", "bytes-keys", "py3"])
def test_cifar10_reads_the_on_disk_pickles(tmp_path, style):
    truth = write_cifar(tmp_path, style=style)
    train = DATASETS["cifar10"](root=str(tmp_path), split="train", seed=0, val_fraction=0.2)
    val = DATASETS["cifar10"](root=str(tmp_path), split="val", seed=0, val_fraction=0.2)
    test = DATASETS["cifar10"](root=str(tmp_path), split="test")
    assert (len(train), len(val), len(test)) == (24, 6, 8)
    img, label = train[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert dataset_info(train).class_names == tuple(NAMES)
    # every image keeps its label and its pixels (C×H×W from the row-major 3072 = R|G|B planes)
    pool = {int(d[0]): (d, lab) for name in truth if name != "test_batch" for d, lab in zip(*truth[name])}
    seen = []
    for ds in (train, val):
        x, y = ds.tensors()
        for img, lab in zip(x, y):
            idx = round(float(img[0, 0, 0]) * 255)
            data, want = pool[idx]
            assert int(lab) == want
            assert torch.equal((img * 255).round().to(torch.uint8), torch.from_numpy(data.reshape(3, 32, 32)))
            seen.append(idx)
    assert sorted(seen) == sorted(pool)  # train and val partition the 5 training batches
    tx, ty = test.tensors()
    assert ty.tolist() == truth["test_batch"][1]
    assert torch.equal((tx * 255).round().to(torch.uint8).reshape(8, -1), torch.from_numpy(truth["test_batch"][0]))


def test_cifar10_root_may_be_the_batches_folder_itself(tmp_path):
    write_cifar(tmp_path)
    ds = DATASETS["cifar10"](root=str(tmp_path / "cifar-10-batches-py"), split="test")
    assert len(ds) == 8


def test_cifar10_val_split_depends_on_the_seed_only(tmp_path):
    write_cifar(tmp_path)
    a = DATASETS["cifar10"](root=str(tmp_path), split="val", seed=0, val_fraction=0.2).tensors()[0]
    b = DATASETS["cifar10"](root=str(tmp_path), split="val", seed=0, val_fraction=0.2).tensors()[0]
    c = DATASETS["cifar10"](root=str(tmp_path), split="val", seed=1, val_fraction=0.2).tensors()[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cifar10_missing_root_names_the_path_and_layout(tmp_path):
    with pytest.raises(DataError) as e:
        DATASETS["cifar10"](root=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg and CIFAR_LAYOUT in msg
    with pytest.raises(DataError, match="data.root"):
        DATASETS["cifar10"](root=None)


def test_cifar10_missing_batch_names_the_file(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError) as e:
        DATASETS["cifar10"](root=str(tmp_path))
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_3") in str(e.value) and CIFAR_LAYOUT in str(e.value)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80\x02not a pickle at all",
        pickle.dumps(["a", "list"]),
        pickle.dumps({"data": np.zeros((2, 3000), np.uint8), "labels": [0, 1]}),
        pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}),
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}),
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}),
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}),
    ],
    ids=["garbage", "not-a-dict", "wrong-width", "float-data", "no-labels", "label-out-of-range", "count-mismatch"],
)
def test_corrupt_cifar_pickle_names_the_file_and_the_expected_layout(tmp_path, payload):
    write_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(payload)
    with pytest.raises(DataError) as e:
        DATASETS["cifar10"](root=str(tmp_path), split="test")
    assert str(bad) in str(e.value) and CIFAR_LAYOUT in str(e.value)


def test_truncated_cifar_pickle_is_a_data_error(tmp_path):
    write_cifar(tmp_path)
    f = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_1"):
        DATASETS["cifar10"](root=str(tmp_path), split="train")


# --- ImageNet as an ImageFolder -----------------------------------------------------------


def write_imagefolder(root, classes=("n01440764", "n01443537", "n01484850"), per_class: int = 3):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(40 + 4 * i, 48, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{c}_{i}.JPEG", format="JPEG", quality=90)
    return classes


def test_imagenet_imagefolder_of_real_jpegs_loads(tmp_path):
    classes = write_imagefolder(tmp_path)
    train = DATASETS["imagenet"](root=str(tmp_path), split="train", image_size=32, val_fraction=0.25)
    val = DATASETS["imagenet"](root=str(tmp_path), split="val", image_size=32, val_fraction=0.25)
    test = DATASETS["imagenet"](root=str(tmp_path), split="test", image_size=32)
    assert (len(train), len(val), len(test)) == (7, 2, 9)
    assert set(train.indices).isdisjoint(val.indices)
    for ds in (train, val, test):
        img, label = ds[0]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert 0 <= float(img.min()) and float(img.max()) <= 1 and 0 <= label < 3
    info = dataset_info(test)
    assert info.class_names == classes and info.num_classes == 3 and info.image_size == 32
    assert [lab for _, lab in (test[i] for i in range(len(test)))] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_imagenet_missing_folder_names_the_path_and_layout(tmp_path):
    with pytest.raises(DataError) as e:
        DATASETS["imagenet"](root=str(tmp_path), split="train")
    assert str(tmp_path / "train") in str(e.value) and IMAGENET_LAYOUT in str(e.value)
    with pytest.raises(DataError, match="data.root"):
        DATASETS["imagenet"](root=None)


def test_imagenet_folder_without_class_folders_is_a_data_error(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "stray.JPEG").write_bytes(b"")
    with pytest.raises(DataError) as e:
        DATASETS["imagenet"](root=str(tmp_path), split="test")
    assert str(tmp_path / "val") in str(e.value) and IMAGENET_LAYOUT in str(e.value)


def test_imagenet_corrupt_jpeg_names_the_file(tmp_path):
    write_imagefolder(tmp_path, per_class=1)
    bad = tmp_path / "val" / "n01440764" / "n01440764_0.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = DATASETS["imagenet"](root=str(tmp_path), split="test", image_size=32)
    with pytest.raises(DataError) as e:
        ds[0]
    assert str(bad) in str(e.value)
    assert ds[1][0].shape == (3, 32, 32)  # the other files still load
