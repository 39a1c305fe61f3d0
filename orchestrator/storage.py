"""The one storage layer: every read and write of run state goes through here (pyarrow.fs).

A location is a local path or a URI: ``s3://bucket/prefix``, ``gs://bucket/prefix``,
``file:///abs/path``, or any other scheme ``pyarrow.fs.FileSystem.from_uri`` knows. An
S3-compatible endpoint (SeaweedFS, MinIO, Ceph, R2, ...) is set the standard way:
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) in the environment, or
``?endpoint_override=host:port`` on the URI; credentials come from the usual AWS chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles).

What goes through it: training checkpoints (``trainables.checkpoint`` encodes and verifies
the bytes; this module moves them), the ``sprout.selected_checkpoint`` tag (always a full
URI, never Ray's scheme-less ``bucket/prefix/...``), the buffered-metrics fallback file,
``train.init_from``, ``sprout eval --run-id`` and ``sprout prepare-data`` output.

Writes are never visible half-done: on a local disk a temporary file is fsynced and renamed;
on an object store the object is put once, complete (an S3 multipart upload only appears
when it is completed).
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from trainables.checkpoint import FILE, CheckpointError, decode_checkpoint, encode_checkpoint

PREFLIGHT_PREFIX = ".sprout-preflight-"
T = TypeVar("T")
_SCHEME_OF_FS = {"s3": "s3", "gcs": "gs"}


class StorageError(OSError):
    """A storage location that cannot be reached, read or written (one line, names the location)."""


def is_remote(location: str | os.PathLike[str]) -> bool:
    s = str(location)
    return "://" in s and not s.startswith("file://")


def _split_query(uri: str) -> tuple[str, str]:
    base, sep, query = uri.partition("?")
    return base, query


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """``base/part/...`` for a path or URI (a URI's ``?query`` stays at the end)."""
    b, query = _split_query(str(base))
    out = "/".join([b.rstrip("/"), *[p.strip("/") for p in parts if p]])
    return f"{out}?{query}" if query else out


def _s3(uri: str) -> tuple[pafs.FileSystem, str]:
    """An S3FileSystem for ``s3://bucket/key[?opts]``: endpoint from the URI or AWS_ENDPOINT_URL,
    region from the URI or AWS_REGION (no region probe), bounded timeouts and retries."""
    parsed = urllib.parse.urlsplit(uri)
    q = dict(urllib.parse.parse_qsl(parsed.query))
    endpoint = q.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = q.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        region = "us-east-1" if endpoint else _bucket_region(parsed.netloc)
    kwargs: dict[str, Any] = {
        "region": region,
        "connect_timeout": float(os.environ.get("SPROUT_S3_CONNECT_TIMEOUT_S", "5")),
        "request_timeout": float(os.environ.get("SPROUT_S3_REQUEST_TIMEOUT_S", "60")),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=int(os.environ.get("SPROUT_S3_MAX_ATTEMPTS", "3"))),
    }
    if endpoint:
        ep = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"{q.get('scheme', 'https')}://{endpoint}")
        kwargs["endpoint_override"] = ep.netloc
        kwargs["scheme"] = q.get("scheme") or ep.scheme or "https"
    elif q.get("scheme"):
        kwargs["scheme"] = q["scheme"]
    if q.get("force_virtual_addressing") in ("true", "1"):
        kwargs["force_virtual_addressing"] = True
    return pafs.S3FileSystem(**kwargs), f"{parsed.netloc}{parsed.path}".rstrip("/")


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str:
    """The region of an AWS bucket when none is configured (what ``FileSystem.from_uri`` does)."""
    try:
        return pafs.resolve_s3_region(bucket)
    except (pa.ArrowException, OSError, ValueError):
        return "us-east-1"


def filesystem(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    s = str(location)
    if not is_remote(s):
        if s.startswith("file://"):
            s = urllib.parse.unquote(urllib.parse.urlsplit(s).path)
        return pafs.LocalFileSystem(), str(Path(s).expanduser().resolve())
    try:
        if s.startswith("s3://"):
            return _s3(s)
        return pafs.FileSystem.from_uri(s)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise StorageError(f"{s!r} is not a usable storage location: {_first_line(e)}") from None


def ray_storage(location: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: local paths as they are; for a URI,
    the same filesystem this module uses (endpoint, timeouts) and the path inside it."""
    if not is_remote(location):
        return filesystem(location)[1], None
    fs, path = filesystem(location)
    return path, fs


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    if "AWS Error " in text:  # "When initiating ... : AWS Error CODE during OP operation: message (Request ID: ...)"
        text = text[text.index("AWS Error ") + len("AWS Error "):].split(" (Request ID")[0]
    return text.splitlines()[0] if text else type(e).__name__


def describe_error(e: BaseException) -> str:
    """What failed, in words, from pyarrow's/AWS's error text."""
    text = str(e)
    low = text.lower()
    if "no_such_bucket" in low or "nosuchbucket" in low or "bucket does not exist" in low:
        return "the bucket does not exist"
    if any(k in low for k in ("signature_does_not_match", "invalid_access_key_id", "invalidaccesskeyid",
                              "access_denied", "accessdenied", "forbidden", "http response code: 403",
                              "security token", "credentials")):
        return f"access denied: wrong or missing credentials ({_first_line(e)})"
    if any(k in low for k in ("network_connection", "couldn't connect", "could not connect", "connection refused",
                              "curlcode: 7", "curlcode: 28", "timed out", "timeout", "resolve host",
                              "name or service not known")):
        return f"the endpoint is unreachable ({_first_line(e)})"
    if isinstance(e, PermissionError):
        return f"permission denied ({_first_line(e)})"
    return _first_line(e)


def _endpoint_note(location: str) -> str:
    if not location.startswith("s3://"):
        return ""
    q = dict(urllib.parse.parse_qsl(_split_query(location)[1]))
    ep = q.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f" (endpoint {ep})" if ep else ""


# ----------------------------------------------------------------------------- bytes


def write_bytes(location: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` so that a reader sees the old content or all of the new, never a part."""
    s = str(location)
    if not is_remote(s):
        from trainables.checkpoint import atomic_write

        atomic_write(Path(filesystem(s)[1]), data)
        return
    fs, path = filesystem(s)
    try:
        # One object, put complete: S3 publishes it (single PUT or completed multipart upload) only at close.
        with fs.open_output_stream(path) as out:
            out.write(data)
    except (pa.ArrowException, OSError) as e:
        raise StorageError(f"could not write {s}{_endpoint_note(s)}: {describe_error(e)}") from None


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    s = str(location)
    fs, path = filesystem(s)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{s} does not exist") from None
    except (pa.ArrowException, OSError) as e:
        if "no_such_key" in str(e).lower():
            raise FileNotFoundError(f"{s} does not exist") from None
        raise StorageError(f"could not read {s}{_endpoint_note(s)}: {describe_error(e)}") from None


def file_type(location: str | os.PathLike[str]) -> pafs.FileType:
    s = str(location)
    fs, path = filesystem(s)
    try:
        return fs.get_file_info(path).type
    except (pa.ArrowException, OSError) as e:
        raise StorageError(f"could not look up {s}{_endpoint_note(s)}: {describe_error(e)}") from None


def exists(location: str | os.PathLike[str]) -> bool:
    return file_type(location) != pafs.FileType.NotFound


def delete(location: str | os.PathLike[str]) -> None:
    s = str(location)
    fs, path = filesystem(s)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except (pa.ArrowException, OSError) as e:
        if "not found" not in str(e).lower():
            raise StorageError(f"could not delete {s}{_endpoint_note(s)}: {describe_error(e)}") from None


def append_text(location: str | os.PathLike[str], text: str) -> None:
    """Append to a small text file (object stores have no append: read, then put the whole again)."""
    s = str(location)
    if not is_remote(s):
        p = Path(filesystem(s)[1])
        p.parent.mkdir(parents=True, exist_ok=True)
        with p.open("a") as f:
            f.write(text)
        return
    old = read_bytes(s) if exists(s) else b""
    write_bytes(s, old + text.encode())


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_file(location: str | os.PathLike[str]) -> str:
    """``location/checkpoint.pt`` for a checkpoint directory, ``location`` for the file itself."""
    s = str(location)
    if _split_query(s)[0].rstrip("/").endswith("/" + FILE) or _split_query(s)[0] == FILE:
        return s
    if not is_remote(s) and Path(filesystem(s)[1]).is_file():
        return s
    return join(s, FILE)


def save_checkpoint(location: str | os.PathLike[str], state: dict[str, Any]) -> str:
    """Write ``state`` as ``location/checkpoint.pt`` (checksummed; atomic); returns ``location``."""
    s = str(location)
    if not is_remote(s):
        from trainables.checkpoint import save_checkpoint as save_local

        save_local(filesystem(s)[1], state)
        return s
    write_bytes(join(s, FILE), encode_checkpoint(state))
    return s


def load_checkpoint(location: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint directory or file, local or a URI: checksum verified, ``weights_only=True``."""
    s = str(location)
    if not is_remote(s):
        from trainables.checkpoint import load_checkpoint as load_local

        return load_local(filesystem(s)[1], map_location=map_location)
    f = checkpoint_file(s)
    try:
        raw = read_bytes(f)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {f}: expected a directory holding {FILE}") from None
    except StorageError as e:
        raise CheckpointError(f"checkpoint {f} could not be read: {e}") from None
    return decode_checkpoint(raw, f, map_location=map_location)


def model_state_from(location: str | os.PathLike[str]) -> dict[str, Any]:
    """The model weights of a checkpoint (``train.init_from``), local or a URI."""
    return load_checkpoint(location)["model"]


def checkpoint_uri(checkpoint: Any, storage_root: str) -> str:
    """A full location for a Ray ``Checkpoint``: its local path, or ``scheme://bucket/...``.

    Ray's ``Checkpoint.path`` on an object store is the path inside the filesystem
    (``bucket/prefix/checkpoint_...``), which no reader can open by itself.
    """
    path = str(checkpoint.path)
    if not is_remote(storage_root):
        return path
    if "://" in path:
        return path
    scheme = storage_root.split("://", 1)[0]
    fs = getattr(checkpoint, "filesystem", None)
    if fs is not None and getattr(fs, "type_name", None) in _SCHEME_OF_FS and scheme not in ("s3", "gs", "gcs"):
        scheme = _SCHEME_OF_FS[fs.type_name]
    query = _split_query(storage_root)[1]
    return f"{scheme}://{path.lstrip('/')}" + (f"?{query}" if query else "")


# ----------------------------------------------------------------------------- preflight


def preflight(location: str) -> None:
    """Write, read back and delete a small marker under ``location`` (``storage.path``).

    Raises ``StorageError`` with one line naming the location and what failed (unreachable
    endpoint, missing bucket, wrong credentials, read-only path). Nothing else is written.
    """
    marker = join(location, f"{PREFLIGHT_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    body = f"sprout preflight {uuid.uuid4().hex}\n".encode()
    where = f"storage.path {location}{_endpoint_note(location)}"
    try:
        fs, path = filesystem(marker)
    except StorageError as e:
        raise StorageError(f"{where}: {e}") from None
    try:
        if not is_remote(location):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        with fs.open_output_stream(path) as out:
            out.write(body)
    except (pa.ArrowException, OSError) as e:
        raise StorageError(f"{where} is not writable: {describe_error(e)}") from None
    try:
        with fs.open_input_stream(path) as f:
            back = f.read()
    except (pa.ArrowException, OSError) as e:
        raise StorageError(f"{where}: a marker was written but could not be read back: {describe_error(e)}") from None
    finally:
        try:
            fs.delete_file(path)
        except OSError:
            pass
    if back != body:
        raise StorageError(f"{where}: the marker read back differs from what was written ({len(back)} bytes)")


# ----------------------------------------------------------------------------- transient errors

RESTORE_WAIT_ENV = "SPROUT_S3_RESTORE_WAIT_S"
DEFAULT_RESTORE_WAIT_S = 60.0


def transient(e: BaseException) -> bool:
    """An object-store error that may heal by itself: unreachable endpoint, 5xx ("internal
    error, please try again", which SeaweedFS and S3 answer while they start or are throttled).
    Not: a missing object or bucket, wrong credentials, a bad checkpoint."""
    if not isinstance(e, OSError) or isinstance(e, (FileNotFoundError, PermissionError)):
        return False
    what = describe_error(e)
    return not (what == "the bucket does not exist" or what.startswith("access denied"))


def retry_remote(fn: Callable[[], T], *, location: str | os.PathLike[str], what: str, wait_s: float | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 say: Callable[[str], None] | None = None) -> T:
    """``fn()``, retried while a remote ``location`` answers with a transient error, for up to
    ``wait_s`` seconds (env ``SPROUT_S3_RESTORE_WAIT_S``, default 60; backoff 1, 2, 4 .. 10 s).

    Why: Ray Train restarts a worker group after a storage error, and the new group's first act
    is to read the last checkpoint, while the store may still be coming back. Local paths are
    called once (their errors do not heal)."""
    if not is_remote(location):
        return fn()
    if wait_s is None:
        raw = os.environ.get(RESTORE_WAIT_ENV, str(DEFAULT_RESTORE_WAIT_S))
        try:
            wait_s = float(raw)
        except ValueError:
            raise ValueError(f"{RESTORE_WAIT_ENV}={raw!r}: expected a number of seconds (0 turns the wait off)") from None
    if wait_s <= 0:
        return fn()
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    deadline, delay = clock() + wait_s, 1.0
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - re-raised unless transient and time is left
            left = deadline - clock()
            if not transient(e) or left <= 0:
                raise
            pause = min(delay, left)
            say(f"sprout: {what} failed ({describe_error(e)}); trying again in {pause:.0f} s "
                f"(for up to {left:.0f} s more, {RESTORE_WAIT_ENV})")
            sleep(pause)
            delay = min(delay * 2, 10.0)
