"""`sprout prepare-data imagenet`: shards, class index, corrupt images, resume, usage errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orchestrator import prepare_data as pd_mod  # noqa: E402
from orchestrator.prepare_data import (  # noqa: E402
    PrepareError,
    SourceFile,
    plan_shards,
    prepare_data_cli,
    prepare_imagenet,
)
from tests.orchestrator.imagenet_fixture import CLASSES, CORRUPT, make_imagenet  # noqa: E402

SHARD_MB = 0.012  # ~12 KB: the ~60 KB of test images make several train shards


def read_split(dst: Path, split: str) -> list[dict]:
    rows = []
    for f in sorted((dst / split).glob("shard-*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def test_shards_hold_every_image_with_its_label_and_class_index(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    labels = make_imagenet(src)
    summary = prepare_imagenet(src, str(dst), shard_size_mb=SHARD_MB, workers=2, progress=False)

    classes = json.loads((dst / "classes.json").read_text())["classes"]
    assert classes == list(CLASSES)
    rows = read_split(dst, "train") + read_split(dst, "val")
    assert sorted(r["path"] for r in rows) == sorted(labels)  # each once; the corrupt one left out
    for r in rows:
        assert r["label"] == labels[r["path"]]
        assert classes[r["label"]] == r["class_id"]
        assert r["image"] == (src / r["path"]).read_bytes()  # the original encoded bytes
    assert summary.images == len(labels) and summary.splits == {"train": 12, "val": 3}

    train_shards = sorted((dst / "train").glob("shard-*.parquet"))
    assert len(train_shards) >= 3 and summary.shards == len(train_shards) + 1
    for f in train_shards:
        meta = pq.read_metadata(f)
        assert meta.schema.to_arrow_schema().field("label").type == "int32"
        paths = pq.read_table(f, columns=["path"]).column("path").to_pylist()
        in_bytes = sum((src / p).stat().st_size for p in paths)
        assert len(paths) == 1 or in_bytes <= SHARD_MB * 2**20
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["splits"]["train"]["images"] == 12
    planned = [p for s in manifest["splits"]["train"]["shards"] for p in s["files"]]
    assert sorted(planned) == sorted([p for p in labels if p.startswith("train/")] + [CORRUPT])


def test_corrupt_image_is_counted_listed_and_skipped(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_imagenet(src)
    summary = prepare_imagenet(src, str(dst), shard_size_mb=SHARD_MB, progress=True)
    assert [p for p, _ in summary.corrupt] == [CORRUPT]
    report = (dst / "corrupt_files.txt").read_text().splitlines()
    assert len(report) == 1 and report[0].startswith(CORRUPT + "\t")
    assert "truncated" in report[0].lower() or "error" in report[0].lower()
    out = capsys.readouterr().out
    assert "15 images" in out and "1 corrupt" in out and "corrupt_files.txt" in out

    # a re-run reports it again (from the shard footer), not silently forgotten
    again = prepare_imagenet(src, str(dst), shard_size_mb=SHARD_MB, progress=False)
    assert again.shards_written == 0 and [p for p, _ in again.corrupt] == [CORRUPT]
    assert (dst / "corrupt_files.txt").read_text().startswith(CORRUPT + "\t")


def test_on_corrupt_fail_fails_clearly_and_keeps_clean_shards(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_imagenet(src)
    with pytest.raises(PrepareError, match="corrupt image") as e:
        prepare_imagenet(src, str(dst), shard_size_mb=SHARD_MB, on_corrupt="fail", progress=False)
    assert CORRUPT in str(e.value) and "--on-corrupt skip" in str(e.value)
    assert (dst / "corrupt_files.txt").read_text().startswith(CORRUPT + "\t")
    assert json.loads((dst / "manifest.json").read_text())["complete"] is False
    written = {p for r in read_split(dst, "train") for p in [r["path"]]}
    assert written and CORRUPT not in written

    assert prepare_data_cli("imagenet", str(src), str(dst), SHARD_MB, 1, "fail", progress=False) == 1
    assert CORRUPT in capsys.readouterr().err

    (src / CORRUPT).unlink()  # the user removes the bad file; the run now completes
    assert prepare_data_cli("imagenet", str(src), str(dst), SHARD_MB, 1, "fail", progress=False) == 0
    assert json.loads((dst / "manifest.json").read_text())["complete"] is True


# `sprout prepare-data` whose second shard write stops half-way (some bytes in its temporary file)
# and waits there, so that the test's SIGKILL lands mid-write, on a real process.
_STALL_SECOND_WRITE = """
import sys, time
import pyarrow.parquet as pq
real, calls = pq.write_table, []
def stalling(table, out, **kw):
    calls.append(1)
    if len(calls) == 2:
        out.write(b"PAR1 half a shard")
        out.flush()
        open(sys.argv[1], "w").write("stalled")
        time.sleep(600)
    return real(table, out, **kw)
pq.write_table = stalling
from orchestrator.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkilled_run_resumes_without_redoing_finished_shards(tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys
    import time

    src, dst = tmp_path / "src", tmp_path / "dst"
    make_imagenet(src)
    marker = tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, "-c", _STALL_SECOND_WRITE, str(marker), "prepare-data", "imagenet",
                             str(src), str(dst), "--shard-size", str(SHARD_MB), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, "prepare-data ended before its second shard"
            if time.time() >= deadline:  # a hang guard, not a timing
                pytest.fail("prepare-data never reached its second shard")
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a real hard kill, mid-write
        proc.wait(timeout=60)
    finished = sorted(dst.glob("*/shard-*.parquet"))
    assert len(finished) == 1, finished
    first = finished[0]
    before = first.stat()
    leftovers = list(dst.glob("*/.shard-*.tmp-*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0, leftovers  # what the kill left behind

    real_write = pd_mod.write_shard
    written: list[str] = []

    def counting(fs, base, plan, table):
        written.append(plan.name)
        return real_write(fs, base, plan, table)

    monkeypatch.setattr(pd_mod, "write_shard", counting)
    summary = prepare_imagenet(src, str(dst), shard_size_mb=SHARD_MB, progress=False)
    assert str(first.relative_to(dst)) not in written
    assert len(written) == summary.shards - 1 and summary.shards_skipped == 1
    after = first.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not list(dst.glob("*/.*tmp*"))  # the killed writer's partial file is gone
    assert len(read_split(dst, "train")) == 12 and len(read_split(dst, "val")) == 3
    assert json.loads((dst / "manifest.json").read_text())["complete"] is True

    written.clear()
    assert prepare_imagenet(src, str(dst), shard_size_mb=SHARD_MB, progress=False).shards_written == 0
    assert written == []


def test_damaged_shard_is_rewritten(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_imagenet(src, corrupt=False)
    prepare_imagenet(src, str(dst), shard_size_mb=SHARD_MB, progress=False)
    victim = dst / "train" / "shard-00001.parquet"
    victim.write_bytes(victim.read_bytes()[:100])  # e.g. copied by hand and cut short
    summary = prepare_imagenet(src, str(dst), shard_size_mb=SHARD_MB, progress=False)
    assert summary.shards_written == 1
    assert len(read_split(dst, "train")) == 12


def test_flat_val_folder_with_kaggle_labels_file_and_uri_destination(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    labels = make_imagenet(src, flat_val=True, corrupt=False)
    assert prepare_data_cli("imagenet", str(src), dst.as_uri(), 1, 2, "skip", progress=False) == 0
    val = read_split(dst, "val")
    assert {r["path"]: r["label"] for r in val} == {p: y for p, y in labels.items() if p.startswith("val/")}
    assert {r["class_id"] for r in val} == set(CLASSES)


def test_usage_errors_exit_2_with_one_clear_line_and_touch_nothing(tmp_path, capsys):
    dst = tmp_path / "dst"
    assert prepare_data_cli("imagenet", str(tmp_path / "nope"), str(dst), 256, 1, "skip") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "nope") in err and "train/<class>" in err
    assert not dst.exists()

    assert prepare_data_cli("cifar100", str(tmp_path), str(dst), 256, 1, "skip") == 2
    assert "unknown dataset 'cifar100'" in capsys.readouterr().err

    src = tmp_path / "src"
    make_imagenet(src)
    for args, needle in [((0, 1, "skip"), "--shard-size"), ((1, 0, "skip"), "--workers"), ((1, 1, "ignore"), "--on-corrupt")]:
        assert prepare_data_cli("imagenet", str(src), str(dst), *args) == 2
        assert needle in capsys.readouterr().err
    assert not dst.exists()

    (src / "val" / "loose.JPEG").write_bytes(b"x")  # class folders and loose files in val/
    assert prepare_data_cli("imagenet", str(src), str(dst), 1, 1, "skip") == 2
    assert "mixes class folders" in capsys.readouterr().err


def test_plan_is_deterministic_balanced_and_capped():
    files = [SourceFile(f"train/c{i % 7}/{i}.JPEG", i % 7, f"c{i % 7}", 1000 + (i * 7919) % 5000) for i in range(400)]
    cap = 60_000
    plans = plan_shards("train", files, cap)
    again = plan_shards("train", list(reversed(files)), cap)
    assert [p.digest for p in plans] == [p.digest for p in again]  # input order does not matter
    sizes = [p.nbytes for p in plans]
    assert max(sizes) <= cap and max(sizes) - min(sizes) <= 2 * 6000
    assert sorted(f.path for p in plans for f in p.files) == sorted(f.path for f in files)
    assert all(len({f.class_id for f in p.files}) > 1 for p in plans)  # shards mix classes
    assert [p.name for p in plans][:2] == ["train/shard-00000.parquet", "train/shard-00001.parquet"]
    assert os.path.basename(plans[-1].name) == f"shard-{len(plans) - 1:05d}.parquet"
