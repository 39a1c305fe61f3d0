"""Decode + augment throughput of the ImageNet Parquet input pipeline, per CPU core.

Issue 6 target: the Parquet pipeline sustains one GPU's ResNet-152 training rate with the
CPU cores a GPU node has per GPU. This script measures the per-core rate that figure
divides by:

1. writes ``--images`` synthetic JPEGs of ImageNet-like size (500×375 and friends, about
   ImageNet's ~110 KB mean) as an ImageNet folder (10 classes);
2. converts it with ``orchestrator.prepare_data.prepare_imagenet`` (timed too);
3. reads the shards with pyarrow and times ``orchestrator.ray_data.decode_and_augment``
   in one process, train (RandomResizedCrop 224 + flip) and eval (resize 256 + centre crop)
   transforms. "per core" divides images by the process's CPU seconds (PIL decodes on one
   thread), so it holds on a machine shared with other jobs; images/s is wall-clock;
4. with ``--processes P``: P processes at once (aggregate, and per core);
5. with ``--ray``: the whole Ray Data pipeline (read_parquet → decode tasks → iterate
   batches on the driver) with ``ray.init(num_cpus=P)``.

    python benchmarks/decode_throughput.py --images 256 --out decode.json
    python benchmarks/decode_throughput.py --images 4096 --processes 16 --ray --gpu-images-per-s 1200

``--gpu-images-per-s R`` prints the cores needed to feed R training images/s.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = ((500, 375), (375, 500), (500, 333), (500, 500), (400, 300), (640, 480))
CLASSES = 10


def synthetic_jpeg(i: int) -> bytes:
    """A smooth gradient with blotches and pixel noise: JPEG size and decode cost like a photo."""
    from PIL import Image

    rng = np.random.default_rng(i)
    w, h = SIZES[i % len(SIZES)]
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    blobs = np.kron(rng.normal(0, 1, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w] * 40
    img = np.clip(base + blobs + rng.normal(0, 16, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_one(args: tuple[str, int]) -> int:
    root, i = args
    path = Path(root) / "train" / f"n{i % CLASSES:08d}" / f"img_{i:07d}.JPEG"
    data = synthetic_jpeg(i)
    path.write_bytes(data)
    return len(data)


def make_folder(root: Path, n: int, processes: int) -> list[int]:
    for c in range(CLASSES):
        (root / "train" / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    with mp.Pool(processes) as pool:
        return pool.map(_write_one, [(str(root), i) for i in range(n)], chunksize=16)


def load_rows(shards: Path, limit: int = 1024) -> dict[str, list]:
    """The first ``limit`` rows of the train shards (the timing loops repeat them)."""
    import pyarrow.parquet as pq

    rows: dict[str, list] = {"image": [], "label": [], "path": []}
    for f in sorted((shards / "train").glob("*.parquet")):
        t = pq.read_table(f, columns=list(rows))
        for k in rows:
            rows[k] += t.column(k).to_pylist()
        if len(rows["label"]) >= limit:
            break
    return {k: v[:limit] for k, v in rows.items()}


def decode_for(rows: dict[str, list], train: bool, image_size: int, batch: int, seconds: float) -> tuple[int, float, float]:
    """Decode batches (repeating the rows) for at least ``seconds``; (images, wall s, CPU s)."""
    from orchestrator.ray_data import decode_and_augment

    n = len(rows["image"])
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        for i in range(0, n, batch):
            chunk = {k: v[i : i + batch] for k, v in rows.items()}
            done += len(decode_and_augment(chunk, train, image_size)["label"])
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return done, elapsed, time.process_time() - c0


def _pool_worker(args: tuple[str, int, int, bool, int, int, float]) -> tuple[int, float, float]:
    shards, k, p, train, image_size, batch, seconds = args
    rows = load_rows(Path(shards))
    mine = {key: v[k::p] for key, v in rows.items()}
    return decode_for(mine, train, image_size, batch, seconds)


def ray_pipeline(shards: Path, processes: int, image_size: int, epochs: int) -> dict[str, Any]:
    import ray

    from orchestrator.ray_data import imagenet_parquet_datasets

    # address="local": a private instance even when another `ray start` cluster runs on this machine
    ray.init(address="local", num_cpus=processes, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = imagenet_parquet_datasets(str(shards), val_fraction=0.0, image_size=image_size, split_names=("train",))
        per_epoch = []
        for _ in range(max(epochs, 2)):  # the first epoch also starts Ray's worker processes
            rows, t0 = 0, time.perf_counter()
            for b in ds["train"].iter_batches(batch_size=256, batch_format="numpy", prefetch_batches=4):
                rows += len(b["label"])
            per_epoch.append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
    steady = min(per_epoch[1:])
    return {"images": rows, "epoch_seconds": per_epoch, "images_per_s": rows / steady}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256, help="synthetic JPEGs to write and shard")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32, help="rows per decode_and_augment call (as the Ray tasks)")
    ap.add_argument("--seconds", type=float, default=8.0, help="minimum timed seconds per measurement")
    ap.add_argument("--processes", type=int, default=1, help="also measure P processes at once (P > 1)")
    ap.add_argument("--ray", action="store_true", help="also time the Ray Data pipeline with num_cpus=P")
    ap.add_argument("--ray-epochs", type=int, default=2)
    ap.add_argument("--shard-size-mb", type=float, default=64)
    ap.add_argument("--gpu-images-per-s", type=float, default=None, help="print the cores needed to feed this rate")
    ap.add_argument("--workdir", default=None, help="keep data here (default: a temporary folder, removed)")
    ap.add_argument("--out", metavar="PATH", help="write the results as JSON here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from orchestrator.prepare_data import prepare_imagenet

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="decode_bench_"))
    procs = max(1, args.processes)
    try:
        t0 = time.perf_counter()
        sizes = make_folder(work / "src", args.images, procs) if not (work / "src").exists() else []
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = prepare_imagenet(work / "src", str(work / "shards"), shard_size_mb=args.shard_size_mb,
                                   workers=procs, progress=False)
        prep_s = time.perf_counter() - t0
        rows = load_rows(work / "shards")
        stages: list[dict[str, Any]] = [{
            "stage": "prepare-data (read + full-decode verify + write)", "processes": procs,
            "images_per_s": summary.images / prep_s, "per_core": summary.images / prep_s / procs,
        }]
        for train in (True, False):
            n, wall, cpu = decode_for(rows, train, args.image_size, args.batch, args.seconds)
            stages.append({
                "stage": f"decode + {'train (RandomResizedCrop+flip)' if train else 'eval (resize+centre crop)'}",
                "processes": 1, "images_per_s": n / wall, "per_core": n / cpu, "cpu_share": cpu / wall,
            })
        if procs > 1:
            with mp.Pool(procs) as pool:
                res = pool.map(_pool_worker, [(str(work / "shards"), k, procs, True, args.image_size, args.batch,
                                               args.seconds) for k in range(procs)])
            agg = sum(n / wall for n, wall, _ in res)
            stages.append({"stage": "decode + train, processes at once", "processes": procs,
                           "images_per_s": agg, "per_core": sum(n for n, _, _ in res) / sum(c for _, _, c in res),
                           "cpu_share": sum(c for _, _, c in res) / sum(w for _, w, _ in res)})
        if args.ray:
            r = ray_pipeline(work / "shards", procs, args.image_size, args.ray_epochs)
            stages.append({"stage": "Ray Data: read_parquet → decode tasks → driver batches (train, best epoch after the 1st)",
                           "processes": procs, "images_per_s": r["images_per_s"],
                           "per_core": r["images_per_s"] / procs, "epoch_seconds": r["epoch_seconds"]})
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    per_core_train = stages[1]["per_core"]
    result = {
        "images": summary.images,
        "mean_jpeg_kib": (sum(sizes) / len(sizes) / 1024) if sizes else None,
        "image_size": args.image_size,
        "generate_s": gen_s,
        "machine": {"platform": platform.platform(), "arch": platform.machine(), "cpu_count": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0]},
        "command": "python " + " ".join(sys.argv),
        "stages": stages,
    }
    if args.gpu_images_per_s:
        result["cores_needed"] = {"gpu_images_per_s": args.gpu_images_per_s,
                                  "cores": math.ceil(args.gpu_images_per_s / per_core_train)}
    print(f"{result['images']} synthetic JPEGs (mean {result['mean_jpeg_kib'] or 0:.0f} KiB), output "
          f"{args.image_size}², {os.cpu_count()} CPUs ({platform.machine()}), load avg {os.getloadavg()[0]:.1f}\n")
    print("| stage | processes | images/s (wall) | images/s per core |")
    print("|---|---:|---:|---:|")
    for s in stages:
        print(f"| {s['stage']} | {s['processes']} | {s['images_per_s']:.0f} | {s['per_core']:.0f} |")
    if "cores_needed" in result:
        c = result["cores_needed"]
        print(f"\ncores to feed {c['gpu_images_per_s']:.0f} training images/s: {c['cores']} "
              f"(at {per_core_train:.0f} train images/s per core)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
