"""Atomic, checksummed training checkpoints loaded with ``weights_only=True``.

A checkpoint is a directory holding ``checkpoint.pt``: a header line with the SHA-256 of the
payload, then the ``torch.save`` payload. It is written to a temporary name, fsynced, then
renamed, so an interrupted write never replaces the last good checkpoint; a truncated or
tampered file fails its checksum and is refused.

``encode_checkpoint``/``decode_checkpoint`` work on bytes, so the same format and checks serve
object storage: ``orchestrator/storage.py`` moves the bytes (S3, GCS), this module stays plain
PyTorch and local files.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FILE = "checkpoint.pt"
MAGIC = b"SPROUT-CHECKPOINT-1 sha256="


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, tampered with or of the wrong kind."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and a rename (POSIX-atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
            raise CheckpointError(f"disk full while writing checkpoint {path}; the previous checkpoint is kept") from e
        raise



def encode_checkpoint(state: dict[str, Any]) -> bytes:
    """The checkpoint file's bytes: the checksum header line, then the ``torch.save`` payload."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    return MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data


def decode_checkpoint(raw: bytes, where: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify the checksum of a checkpoint file's bytes and load them with ``weights_only=True``.

    ``where`` names the file in errors (a path or a URI)."""
    f = where
    head, _, data = raw.partition(b"\n")
    if not head.startswith(MAGIC):
        raise CheckpointError(f"{f} is not a SPROUT checkpoint (missing the checksum header)")
    expected = head[len(MAGIC):].decode(errors="replace")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {f} failed its checksum (sha256 {actual[:12]}... != recorded {expected[:12]}...): "
            "it is truncated or was modified; refusing to load it"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors are many types
        raise CheckpointError(f"checkpoint {f} could not be loaded with weights_only=True: {e}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {f} is not a training checkpoint (no 'model' entry)")
    return state


def save_checkpoint(directory: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/checkpoint.pt`` atomically, with its checksum in the header."""
    d = Path(directory)
    atomic_write(d / FILE, encode_checkpoint(state))
    return d


def load_checkpoint(directory: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify the checksum and load with ``weights_only=True``; raise CheckpointError otherwise."""
    d = Path(directory)
    f = d / FILE if d.is_dir() else d
    if not f.is_file():
        raise CheckpointError(f"no checkpoint at {f}: expected a directory holding {FILE}")
    return decode_checkpoint(f.read_bytes(), f, map_location=map_location)


def model_state_from(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The model weights of a checkpoint directory or file (for ``train.init_from``)."""
    return load_checkpoint(path)["model"]
