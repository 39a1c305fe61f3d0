"""`sprout prepare-data imagenet SRC DST`: an ImageNet folder into Parquet shards for Ray Data.

Input (``SRC``, a local folder): ``train/<wnid>/<image>`` and either ``val/<wnid>/<image>``
or a flat ``val/<image>`` plus a labels file (``val_labels.txt`` with ``<file> <wnid>``
lines, or Kaggle's ``LOC_val_solution.csv``) in ``SRC`` or ``SRC/val``.

Output (``DST``, a local path or any pyarrow filesystem URI such as ``s3://bucket/imagenet``):

- ``train/shard-00000.parquet``, ... and ``val/shard-*.parquet``: columns ``image``
  (binary, the original encoded bytes), ``label`` (int32 class index), ``class_id``
  (string wnid), ``path`` (string, relative to ``SRC``);
- ``classes.json``: the class index (``classes[i]`` is the wnid of label ``i``; the sorted
  class folders of ``train/``, as torchvision's ImageFolder orders them);
- ``manifest.json``: the plan (shard → source files) and, once a run finishes,
  ``"complete": true`` with row and byte counts; readers refuse an incomplete manifest;
- ``corrupt_files.txt``: ``<split>/<path><TAB><reason>`` per image that failed to decode.

Plan: files are ordered by a hash of their path (so every shard mixes classes, which a
streaming reader with a small shuffle buffer needs) and cut into ``ceil(total/limit)``
size-balanced shards, each at most ``shard_size_mb`` unless one file is larger. The plan is
a pure function of the file list (paths and sizes): a re-run recomputes it and skips every
shard whose footer carries the same plan digest and row count, so an interrupted run
resumes without redoing finished shards. Each shard is written to a temporary name and
then moved into place, so a reader never sees half a shard.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from trainables.data.base import DataError

FORMAT = "sprout-imagenet-parquet"
VERSION = 1
DATASETS = ("imagenet",)
ON_CORRUPT = ("skip", "fail")
# torchvision's ImageFolder extensions: the same files the folder dataset would load.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VAL_LABEL_FILES = ("val_labels.txt", "LOC_val_solution.csv", "val/val_labels.txt", "val/LOC_val_solution.csv")
SYNSET_NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt")
SCHEMA = pa.schema(
    [("image", pa.binary()), ("label", pa.int32()), ("class_id", pa.string()), ("path", pa.string())]
)
# Encoded images do not compress; compressing them only costs CPU on write and read.
COMPRESSION = {"image": "NONE", "label": "ZSTD", "class_id": "ZSTD", "path": "ZSTD"}
ROW_GROUP_BYTES = 32 * 2**20  # lets readers stream a shard in pieces instead of all at once
LAYOUT = (
    "SRC/train/<class>/<image> and SRC/val/<class>/<image> "
    "(or SRC/val/<image> with SRC/val_labels.txt or SRC/LOC_val_solution.csv)"
)
META_DIGEST = b"sprout.plan_digest"
META_CORRUPT = b"sprout.corrupt"


class PrepareError(RuntimeError):
    """The conversion ran but failed (corrupt images with on_corrupt='fail', I/O errors)."""


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to SRC, '/'-separated
    label: int
    class_id: str
    size: int


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    files: tuple[SourceFile, ...]

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.index:05d}.parquet"

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def digest(self) -> str:
        h = hashlib.sha256(f"{FORMAT}/{VERSION}\n".encode())
        for f in self.files:
            h.update(f"{f.path}\t{f.size}\t{f.label}\n".encode())
        return h.hexdigest()


@dataclass
class Summary:
    """What a run produced (counts cover finished shards, whether written now or before)."""

    dst: str
    images: int = 0
    shards: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    bytes: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    splits: dict[str, int] = field(default_factory=dict)

    def text(self) -> str:
        per_split = ", ".join(f"{s}: {n} images" for s, n in self.splits.items())
        corrupt = f"{len(self.corrupt)} corrupt (listed in {join(self.dst, 'corrupt_files.txt')})"
        return (
            f"prepare-data: {self.images} images in {self.shards} shards ({per_split}); "
            f"{self.shards_written} written, {self.shards_skipped} already present; "
            f"{self.bytes / 2**20:.1f} MiB; {corrupt}; {self.seconds:.1f} s"
        )


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


# ----------------------------------------------------------------------------- source scan


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_of_classes(src: Path, split: str, class_to_idx: dict[str, int]) -> list[SourceFile]:
    out = []
    for d in _class_dirs(src / split):
        if d.name not in class_to_idx:
            raise DataError(f"{d} is a class folder that {src / 'train'} does not have; expected {LAYOUT}")
        for p in _image_files(d):
            out.append(SourceFile(f"{split}/{d.name}/{p.name}", class_to_idx[d.name], d.name, p.stat().st_size))
    return out


def read_val_labels(path: Path, class_to_idx: dict[str, int]) -> dict[str, str]:
    """``file → wnid`` from ``<file> <wnid>`` lines or Kaggle's ``ImageId,PredictionString`` CSV.

    Keys are file names and also their stems (LOC_val_solution.csv omits the extension).
    """
    labels: dict[str, str] = {}
    with open(path, newline="") as fh:
        rows = csv.reader(fh) if path.suffix.lower() == ".csv" else (line.replace(",", " ").split() for line in fh)
        for lineno, row in enumerate(rows, 1):
            if not row or not row[0].strip() or row[0].startswith("#"):
                continue
            if lineno == 1 and row[0].strip() == "ImageId":
                continue  # the CSV header
            if len(row) < 2 or not row[1].split():
                raise DataError(f"{path}:{lineno}: expected '<file> <class id>', got {' '.join(row)!r}")
            name, wnid = row[0].strip(), row[1].split()[0]
            if wnid not in class_to_idx:
                raise DataError(f"{path}:{lineno}: class {wnid!r} is not a class folder of the train split")
            labels[name] = wnid
            labels.setdefault(Path(name).stem, wnid)
    return labels


def _flat_val(src: Path, class_to_idx: dict[str, int]) -> list[SourceFile]:
    files = _image_files(src / "val")
    if not files:
        return []
    label_file = next((src / c for c in VAL_LABEL_FILES if (src / c).is_file()), None)
    if label_file is None:
        raise DataError(
            f"{src / 'val'} holds images but no class folders and no labels file "
            f"({' or '.join(VAL_LABEL_FILES)} under {src}); expected {LAYOUT}"
        )
    labels = read_val_labels(label_file, class_to_idx)
    out = []
    for p in files:
        wnid = labels.get(p.name) or labels.get(p.stem)
        if wnid is None:
            raise DataError(f"{p} has no label in {label_file}")
        out.append(SourceFile(f"val/{p.name}", class_to_idx[wnid], wnid, p.stat().st_size))
    return out


def scan_imagenet(src: str | os.PathLike) -> tuple[list[str], dict[str, list[SourceFile]]]:
    """Class ids (index order) and the image files of each split found under ``src``."""
    root = Path(src).expanduser()
    if not root.is_dir():
        raise DataError(f"source folder not found: {root}; expected {LAYOUT}")
    if not (root / "train").is_dir():
        raise DataError(f"{root / 'train'} not found; expected {LAYOUT}")
    classes = [d.name for d in _class_dirs(root / "train")]
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders; expected {LAYOUT}")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    splits = {"train": _files_of_classes(root, "train", class_to_idx)}
    if not splits["train"]:
        raise DataError(f"{root / 'train'} has no images ({', '.join(IMAGE_EXTENSIONS)}); expected {LAYOUT}")
    val = root / "val"
    if val.is_dir():
        by_class, flat = _class_dirs(val), _image_files(val)
        if by_class and flat:
            raise DataError(f"{val} mixes class folders and loose images; expected one layout: {LAYOUT}")
        splits["val"] = _files_of_classes(root, "val", class_to_idx) if by_class else _flat_val(root, class_to_idx)
    return classes, splits


def _synset_names(src: Path, classes: Sequence[str]) -> dict[str, str]:
    for name in SYNSET_NAME_FILES:
        p = src / name
        if p.is_file():
            names = {}
            for line in p.read_text().splitlines():
                wnid, _, text = line.strip().partition(" ")
                if wnid in classes:
                    names[wnid] = text.strip()
            return names
    return {}


# ----------------------------------------------------------------------------- planning


def _order_key(f: SourceFile) -> bytes:
    return hashlib.blake2b(f.path.encode(), digest_size=8).digest()


def plan_shards(split: str, files: Sequence[SourceFile], shard_bytes: int) -> list[ShardPlan]:
    """Size-balanced shards over hash-ordered files; deterministic for a given file list."""
    if not files:
        return []
    ordered = sorted(files, key=_order_key)
    total = sum(f.size for f in ordered)
    n = max(1, math.ceil(total / shard_bytes))
    while True:
        target = total / n
        groups: list[list[SourceFile]] = [[] for _ in range(n)]
        start = 0
        for f in ordered:
            # by the file's midpoint on the cumulative-bytes axis: shards come out equal ± one file
            groups[min(n - 1, int((start + f.size / 2) / target))].append(f)
            start += f.size
        groups = [g for g in groups if g]
        too_big = any(len(g) > 1 and sum(f.size for f in g) > shard_bytes for g in groups)
        if not too_big or n >= len(ordered):
            return [ShardPlan(split, i, tuple(g)) for i, g in enumerate(groups)]
        n += 1


# ----------------------------------------------------------------------------- verify + write


def verify_image(data: bytes) -> str | None:
    """None if ``data`` decodes fully to RGB with PIL, else the reason it does not."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure and checksums (PNG); cheap
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB")  # a full decode: truncated JPEGs only fail here
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")
    return None


def load_and_verify(src: Path, f: SourceFile) -> tuple[bytes | None, str | None]:
    try:
        data = (src / f.path).read_bytes()
    except OSError as e:
        return None, f"unreadable: {e}"
    reason = verify_image(data)
    return (None, reason) if reason else (data, None)


def shard_table(plan: ShardPlan, rows: Sequence[tuple[SourceFile, bytes]], corrupt: Sequence[str]) -> pa.Table:
    table = pa.table(
        {
            "image": pa.array([d for _, d in rows], pa.binary()),
            "label": pa.array([f.label for f, _ in rows], pa.int32()),
            "class_id": pa.array([f.class_id for f, _ in rows], pa.string()),
            "path": pa.array([f.path for f, _ in rows], pa.string()),
        },
        schema=SCHEMA,
    )
    return table.replace_schema_metadata({META_DIGEST: plan.digest.encode(), META_CORRUPT: json.dumps(list(corrupt))})


def write_shard(fs: pafs.FileSystem, base: str, plan: ShardPlan, table: pa.Table) -> int:
    """Write one shard atomically (temporary name, then move); returns its size in bytes."""
    final = join(base, plan.name)
    tmp = join(base, plan.split, f".{Path(plan.name).name}.tmp-{uuid.uuid4().hex[:8]}")
    mean = max(1, plan.nbytes // max(len(plan.files), 1))
    try:
        with fs.open_output_stream(tmp) as out:
            pq.write_table(
                table, out, compression=COMPRESSION, row_group_size=max(1, ROW_GROUP_BYTES // mean),
                use_dictionary=["class_id"],
            )
        fs.move(tmp, final)  # rename on local disks; on object stores the move publishes it whole
    except BaseException:
        _delete_quietly(fs, tmp)
        raise
    return fs.get_file_info(final).size


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except OSError:
        pass


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def finished_shard(fs: pafs.FileSystem, base: str, plan: ShardPlan) -> tuple[int, int, list[str]] | None:
    """(rows, bytes, corrupt paths) of an existing shard written for this exact plan, else None."""
    path = join(base, plan.name)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_file(path) as fh:
            meta = pq.read_metadata(fh)
    except (OSError, pa.ArrowException):
        return None  # unreadable footer: written by something else, or damaged; redo it
    kv = meta.metadata or {}
    if kv.get(META_DIGEST) != plan.digest.encode():
        return None
    corrupt = json.loads(kv.get(META_CORRUPT, b"[]"))
    if meta.num_rows != len(plan.files) - len(corrupt):
        return None
    return meta.num_rows, info.size, corrupt


def open_destination(dst: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) for a local path or a pyarrow filesystem URI."""
    from orchestrator import storage  # the one storage layer (endpoint from AWS_ENDPOINT_URL, timeouts)

    if "://" in dst:
        try:
            return storage.filesystem(dst)
        except (storage.StorageError, pa.ArrowException, ValueError) as e:
            raise ValueError(f"DST {dst!r} is not a usable pyarrow filesystem URI: {e}") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(dst))


def _clean_destination(fs: pafs.FileSystem, base: str, plans: dict[str, list[ShardPlan]]) -> None:
    """Remove temporaries of interrupted runs and shards that the current plan no longer has."""
    for split in ("train", "val"):
        wanted = {Path(p.name).name for p in plans.get(split, [])}
        listing = fs.get_file_info(pafs.FileSelector(join(base, split), allow_not_found=True))
        for info in listing:
            name = info.base_name
            stale_shard = name.startswith("shard-") and name.endswith(".parquet") and name not in wanted
            if info.type == pafs.FileType.File and (".tmp-" in name or stale_shard):
                fs.delete_file(info.path)


def _manifest(
    classes: list[str], plans: dict[str, list[ShardPlan]], shard_bytes: int,
    done: dict[str, tuple[int, int, list[str]]] | None, complete: bool,
) -> bytes:
    splits = {}
    for split, ps in plans.items():
        shards = []
        for p in ps:
            entry: dict[str, object] = {"path": p.name, "digest": p.digest, "files": [f.path for f in p.files]}
            if done is not None and p.name in done:
                rows, size, corrupt = done[p.name]
                entry |= {"rows": rows, "bytes": size, "corrupt": corrupt}
            shards.append(entry)
        rows_total = sum(done[p.name][0] for p in ps) if complete and done is not None else None
        splits[split] = {"images": rows_total, "shards": shards}
    doc = {
        "format": FORMAT, "version": VERSION, "complete": complete, "num_classes": len(classes),
        "classes_file": "classes.json", "shard_size_bytes": shard_bytes, "splits": splits,
    }
    return json.dumps(doc, indent=1).encode()


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="prepare-data", disable=not enabled, file=sys.stderr)


def prepare_imagenet(
    src: str | os.PathLike,
    dst: str,
    *,
    shard_size_mb: float = 256,
    workers: int = 1,
    on_corrupt: str = "skip",
    progress: bool = True,
) -> Summary:
    """Convert an ImageNet folder into Parquet shards (see the module docstring).

    Raises DataError or ValueError (usage: bad arguments or source layout) before writing
    anything, and PrepareError when corrupt images are found with ``on_corrupt='fail'``
    (clean shards are kept, so a re-run after fixing the files resumes).
    """
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"--on-corrupt must be one of {list(ON_CORRUPT)}, got {on_corrupt!r}")
    if not shard_size_mb > 0:
        raise ValueError(f"--shard-size must be > 0 (MB), got {shard_size_mb}")
    if int(workers) < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    src_path = Path(src).expanduser().resolve()
    classes, files = scan_imagenet(src_path)
    fs, base = open_destination(dst)
    shard_bytes = int(shard_size_mb * 2**20)
    plans = {split: plan_shards(split, fs_, shard_bytes) for split, fs_ in files.items()}
    summary = Summary(dst=dst)

    for split in plans:
        fs.create_dir(join(base, split), recursive=True)
    _clean_destination(fs, base, plans)
    classes_doc = {"classes": classes, "names": _synset_names(src_path, classes)}
    write_bytes_atomic(fs, join(base, "classes.json"), json.dumps(classes_doc, indent=1).encode())
    write_bytes_atomic(fs, join(base, "manifest.json"), _manifest(classes, plans, shard_bytes, None, False))

    done: dict[str, tuple[int, int, list[str]]] = {}
    pending: list[ShardPlan] = []
    for p in (p for ps in plans.values() for p in ps):
        found = finished_shard(fs, base, p)
        if found is None:
            pending.append(p)
        else:
            done[p.name] = found
            summary.shards_skipped += 1
    if summary.shards_skipped and progress:
        print(f"prepare-data: resuming; {summary.shards_skipped} finished shards kept", file=sys.stderr)

    failed: list[ShardPlan] = []  # shards not written because they hold corrupt images (fail mode)
    new_corrupt: dict[str, list[tuple[str, str]]] = {}
    bar = _progress(sum(len(p.files) for p in pending), progress)
    try:
        # threads, not processes: PIL releases the GIL while decoding, and bytes need no pickling
        with ThreadPoolExecutor(max_workers=int(workers)) as pool, closing(_verified(pool, src_path, pending)) as it:
            for plan, results in it:
                rows, corrupt = [], []
                for f, (data, reason) in zip(plan.files, results):
                    if reason is None:
                        rows.append((f, data))
                    else:
                        corrupt.append((f.path, reason))
                    bar.update(1)
                new_corrupt[plan.name] = corrupt
                if corrupt and on_corrupt == "fail":
                    failed.append(plan)
                    continue
                size = write_shard(fs, base, plan, shard_table(plan, rows, [c for c, _ in corrupt]))
                done[plan.name] = (len(rows), size, [c for c, _ in corrupt])
                summary.shards_written += 1
    finally:
        bar.close()

    corrupt_all: list[tuple[str, str]] = []
    for p in (p for ps in plans.values() for p in ps):
        if p.name in new_corrupt:
            corrupt_all += new_corrupt[p.name]
        elif p.name in done:
            corrupt_all += [(c, "reported by an earlier run") for c in done[p.name][2]]
    report = "".join(f"{path}\t{reason}\n" for path, reason in corrupt_all)
    write_bytes_atomic(fs, join(base, "corrupt_files.txt"), report.encode())

    summary.corrupt = corrupt_all
    summary.shards = sum(len(ps) for ps in plans.values())
    summary.images = sum(v[0] for v in done.values())
    summary.bytes = sum(v[1] for v in done.values())
    summary.splits = {s: sum(done[p.name][0] for p in ps if p.name in done) for s, ps in plans.items()}
    summary.seconds = time.perf_counter() - t0
    if corrupt_all and on_corrupt == "fail":
        first, why = corrupt_all[0]
        raise PrepareError(
            f"{len(corrupt_all)} corrupt image(s) under {src_path}, first {first} ({why}); all listed in "
            f"{join(dst, 'corrupt_files.txt')}; {len(failed)} shard(s) holding them were not written. "
            "Fix or remove the files and re-run (finished shards are kept), or pass --on-corrupt skip"
        )
    write_bytes_atomic(fs, join(base, "manifest.json"), _manifest(classes, plans, shard_bytes, done, True))
    if progress:
        print(summary.text())
    return summary


def _verified(
    pool: ThreadPoolExecutor, src: Path, plans: Iterable[ShardPlan]
) -> Iterable[tuple[ShardPlan, list[tuple[bytes | None, str | None]]]]:
    """Per shard, in plan order: load+verify results, with the next shard already in flight."""
    inflight: deque[tuple[ShardPlan, list[Future]]] = deque()
    try:
        for plan in plans:
            inflight.append((plan, [pool.submit(load_and_verify, src, f) for f in plan.files]))
            if len(inflight) > 1:
                p, futs = inflight.popleft()
                yield p, [f.result() for f in futs]
        while inflight:
            p, futs = inflight.popleft()
            yield p, [f.result() for f in futs]
    finally:
        for _, futs in inflight:  # interrupted: do not verify shards nobody will write
            for f in futs:
                f.cancel()


def prepare_data_cli(
    dataset: str,
    src: str,
    dst: str,
    shard_size_mb: float = 256,
    workers: int = 1,
    on_corrupt: str = "skip",
    progress: bool = True,
) -> int:
    """`sprout prepare-data DATASET SRC DST`: 0 done, 2 usage error (one line), 1 run failed."""
    prog = "sprout prepare-data"
    if dataset not in DATASETS:
        print(f"{prog}: error: unknown dataset {dataset!r}; expected one of: {', '.join(DATASETS)}", file=sys.stderr)
        return 2
    try:
        prepare_imagenet(
            src, dst, shard_size_mb=shard_size_mb, workers=workers, on_corrupt=on_corrupt, progress=progress
        )
    except ValueError as e:  # DataError is a ValueError: source layout, arguments, DST URI
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (PrepareError, OSError) as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return 1
    return 0
