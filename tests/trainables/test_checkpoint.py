"""Checkpoints: atomic writes, checksums, ``weights_only`` loading, clear refusals."""

from __future__ import annotations

import errno
import io
import os

import pytest
import torch

from trainables import checkpoint as ckpt
from trainables.checkpoint import FILE, CheckpointError, load_checkpoint, save_checkpoint
from trainables.loop import OptimConfig, build_optimizer, training_state
from trainables.methods import build_method


def state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = build_optimizer(model, OptimConfig(lr=0.1))
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    method = build_method("sprout", {}, num_classes=3, lr=0.1, seed=seed)
    return training_state(model, opt, method, epoch=seed, run="test")


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return a == b


def test_round_trip_keeps_every_part_of_the_training_state(tmp_path):
    s = state(3)
    save_checkpoint(tmp_path, s)
    loaded = load_checkpoint(tmp_path)
    assert set(loaded) == {"model", "optimizer", "method", "epoch", "torch_rng", "meta"}
    assert same(loaded, s)
    assert load_checkpoint(tmp_path / FILE)["epoch"] == 3  # the file itself works too
    assert [p.name for p in tmp_path.iterdir()] == [FILE]  # no temporary files left behind


def test_saving_again_replaces_the_checkpoint(tmp_path):
    save_checkpoint(tmp_path, state(0))
    save_checkpoint(tmp_path, state(1))
    assert load_checkpoint(tmp_path)["epoch"] == 1


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nope")):
        load_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("keep", [0, 10, 40, 200, -1])
def test_truncated_checkpoint_is_refused_naming_the_path(tmp_path, keep):
    save_checkpoint(tmp_path, state())
    f = tmp_path / FILE
    raw = f.read_bytes()
    f.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("where", ["payload", "header"])
def test_tampered_checkpoint_is_refused_naming_the_path(tmp_path, where):
    save_checkpoint(tmp_path, state())
    f = tmp_path / FILE
    raw = bytearray(f.read_bytes())
    i = len(raw) // 2 if where == "payload" else len(ckpt.MAGIC) + 3
    raw[i] = (raw[i] + 1) % 256 if where == "payload" else ord("0") + (raw[i] - ord("0") + 1) % 10
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum") as e:
        load_checkpoint(tmp_path)
    assert str(f) in str(e.value)


def test_a_plain_torch_file_is_refused(tmp_path):
    torch.save({"model": {}}, tmp_path / FILE)
    with pytest.raises(CheckpointError, match="not a SPROUT checkpoint"):
        load_checkpoint(tmp_path)


class Arbitrary:
    """Not a tensor, container or primitive: unpickling it needs code execution."""


def test_pickled_objects_are_refused_by_weights_only_even_with_a_valid_checksum(tmp_path):
    save_checkpoint(tmp_path, {"model": {}, "payload": Arbitrary()})
    with pytest.raises(CheckpointError, match="weights_only") as e:
        load_checkpoint(tmp_path)
    assert str(tmp_path / FILE) in str(e.value)


def test_a_non_training_payload_is_refused(tmp_path):
    save_checkpoint(tmp_path, {"weights": torch.ones(2)})
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        load_checkpoint(tmp_path)


def test_serialisation_failing_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    good = state(1)
    save_checkpoint(tmp_path, good)
    real_save = torch.save

    def half_save(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        save_checkpoint(tmp_path, state(2))
    monkeypatch.undo()
    assert same(load_checkpoint(tmp_path), good)
    assert [p.name for p in tmp_path.iterdir()] == [FILE]


def test_rename_failing_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    good = state(1)
    save_checkpoint(tmp_path, good)
    written = []

    def boom(src, dst):
        written.append(os.path.getsize(src))  # the new file was fully written before the rename
        raise OSError(errno.EIO, "rename failed")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(tmp_path, state(2))
    monkeypatch.undo()
    assert written and written[0] > 0
    assert same(load_checkpoint(tmp_path), good)
    assert [p.name for p in tmp_path.iterdir()] == [FILE]


def test_disk_full_is_a_checkpoint_error_naming_the_path_and_keeps_the_previous(tmp_path, monkeypatch):
    good = state(1)
    save_checkpoint(tmp_path, good)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", full)
    with pytest.raises(CheckpointError, match="disk full") as e:
        save_checkpoint(tmp_path, state(2))
    monkeypatch.undo()
    assert str(tmp_path / FILE) in str(e.value)
    assert same(load_checkpoint(tmp_path), good)


def test_a_stray_partial_temp_file_from_a_killed_writer_is_harmless(tmp_path):
    good = state(1)
    save_checkpoint(tmp_path, good)
    (tmp_path / f".{FILE}.abc123.tmp").write_bytes(b"SPROUT-CHECKPOINT-1 sha256=00\npartial")
    assert same(load_checkpoint(tmp_path), good)
    save_checkpoint(tmp_path, state(2))
    assert load_checkpoint(tmp_path)["epoch"] == 2


def test_encoded_bytes_are_the_file_format_and_decode_verifies_them(tmp_path):
    """``encode_checkpoint``/``decode_checkpoint`` (used for object storage) are exactly the file's bytes."""
    s = state(4)
    save_checkpoint(tmp_path, s)
    raw = (tmp_path / FILE).read_bytes()
    assert ckpt.encode_checkpoint(s) == raw
    assert same(ckpt.decode_checkpoint(raw, "s3://bucket/run/checkpoint.pt"), s)
    with pytest.raises(CheckpointError, match="checksum") as e:
        ckpt.decode_checkpoint(raw[:-1], "s3://bucket/run/checkpoint.pt")
    assert "s3://bucket/run/checkpoint.pt" in str(e.value)
