"""Checkpoint save and load time: a local SeaweedFS S3 endpoint vs the local disk (issue 12).

Target (issue 12): checkpointing must not stall training by more than **5 % of an epoch** at the
presets' checkpoint frequency. A checkpoint is written synchronously (rank 0 writes the training
state, then ``ray.train.report`` uploads it before the next epoch starts) every
``train.checkpoint_every`` epochs, read from the workload's preset, so the stall per epoch is
one save over that many epochs: stall fraction = save seconds ÷ (checkpoint_every × epoch
seconds). The table also shows the stall of a checkpoint after every epoch.

What is timed, for the full training state of VGG-16 (CIFAR-10, 10 classes) and ResNet-50
(ImageNet, 1000 classes) from ``trainables.MODELS`` — weights, SGD momentum buffers, SPROUT's
β and its optimizer, RNG state, exactly what ``trainables.loop.training_state`` checkpoints:

- ``local``: ``orchestrator.storage.save_checkpoint`` to a local directory (encode + sha256 +
  fsynced temporary file + rename) and ``load_checkpoint`` back (checksum + ``weights_only``);
- ``s3``: the same two calls on ``s3://bucket/...`` (encode + one object put / one get);
- ``s3 via Ray``: what a training worker does: save to a local temporary directory, then
  upload it with ``pyarrow.fs.copy_files`` (Ray Train's checkpoint upload) to the bucket;
- ``local via Ray``: the same, copied to a local directory (Ray Train on a local ``storage.path``).

The stall is the save of the path training takes: ``local_ray_save_s`` on a local
``storage.path``, ``s3_ray_save_s`` on ``s3://`` (``orchestrator/ray_train.py`` writes the state
to a local temporary directory and ``ray.train.report`` copies or uploads it; training never
calls ``storage.save_checkpoint`` on the storage location itself). The direct saves are shown
for the storage layer's own API (``sprout prepare-data``, tools), not counted as a stall.

The S3 endpoint is a real ``weed mini`` started on 127.0.0.1 by this script (``tests/services.py``),
so the numbers are loopback numbers: a remote bucket adds network time (size ÷ bandwidth).

Epoch times for the stall fraction are arguments, defaulting to fast epochs (a shorter epoch
makes the fraction larger): VGG-16 on CIFAR-10, 14.7 s (the paper's Table 6 natural epoch; SPROUT
is no slower); ResNet-50 on ImageNet, 64 s (1.28 M images at 8 GPUs × 2,500 images/s);
ResNet-152 on ImageNet, 37.2 s (its preset's 16 GPUs × 2,150 images/s, SPROUT's bf16 rate on one
H200 in BENCHMARKS.md).

    python benchmarks/checkpoint_storage.py --repeats 5 --json checkpoint_storage.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._emit import emit  # noqa: E402 - needs the repo root on sys.path

TARGET_STALL = 0.05
WORKLOADS = {  # model, classes, input channels, default epoch seconds (see the docstring), preset
    "vgg16": ("vgg16", 10, 3, 14.7, "cifar10_vgg16.yaml"),
    "resnet50": ("resnet50", 1000, 3, 64.0, "imagenet_resnet50.yaml"),
    "resnet152": ("resnet152", 1000, 3, 37.2, "imagenet_resnet152.yaml"),
}


def checkpoint_every(preset: str) -> int:
    """``train.checkpoint_every`` of ``configs/<preset>``, as ``sprout train`` would read it."""
    from orchestrator.config import load_config

    root = Path(__file__).resolve().parents[1]
    # the preset names a cluster data path; any existing folder lets the rest validate
    return load_config(root / "configs" / preset, [f"data.root={root}"]).train.checkpoint_every


def training_state(model_name: str, num_classes: int, channels: int) -> dict[str, Any]:
    import torch

    from trainables import MODELS
    from trainables.loop import OptimConfig, build_optimizer
    from trainables.loop import training_state as state_of
    from trainables.methods import build_method

    torch.manual_seed(0)
    model = MODELS[model_name](num_classes=num_classes, in_channels=channels)
    opt = build_optimizer(model, OptimConfig(lr=0.1, momentum=0.9))
    for p in model.parameters():  # momentum buffers as after a real step, without a forward pass
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    method = build_method("sprout", {}, num_classes=num_classes, lr=0.1, seed=0)
    return state_of(model, opt, method, epoch=0, run="benchmark")


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(state: dict[str, Any], bucket: str, local_root: Path, repeats: int) -> dict[str, Any]:
    import pyarrow.fs as pafs

    from orchestrator import storage
    from trainables.checkpoint import FILE

    run = uuid.uuid4().hex[:8]
    local = local_root / run / "checkpoint_000000"
    remote = f"s3://{bucket}/bench-{run}/checkpoint_000000"
    via_ray = f"s3://{bucket}/bench-{run}/ray_checkpoint_000000"
    fs, ray_dst = storage.filesystem(via_ray)

    local_fs = pafs.LocalFileSystem()
    ray_local = local_root / run / "ray_checkpoint_000000"

    def ray_path(dst: str, dst_fs) -> None:
        with tempfile.TemporaryDirectory(dir=local_root) as tmp:
            storage.save_checkpoint(tmp, state)
            dst_fs.create_dir(dst, recursive=True)  # as Ray does before its copy
            pafs.copy_files(tmp, dst, source_filesystem=local_fs, destination_filesystem=dst_fs)

    res: dict[str, Any] = {
        "local_save_s": _time(lambda: storage.save_checkpoint(local, state), repeats),
        "local_load_s": _time(lambda: storage.load_checkpoint(local), repeats),
        "s3_save_s": _time(lambda: storage.save_checkpoint(remote, state), repeats),
        "s3_load_s": _time(lambda: storage.load_checkpoint(remote), repeats),
        "local_ray_save_s": _time(lambda: ray_path(str(ray_local), local_fs), repeats),
        "s3_ray_save_s": _time(lambda: ray_path(ray_dst, fs), repeats),
    }
    res["bytes"] = (local / FILE).stat().st_size
    assert storage.load_checkpoint(storage.join(via_ray, FILE))["epoch"] == 0  # what was uploaded loads
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", default="vgg16,resnet50,resnet152")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epoch-s", action="append", default=[], metavar="WORKLOAD=SECONDS",
                    help="epoch time for the stall fraction (defaults: vgg16=14.7, resnet50=64, resnet152=37.2)")
    ap.add_argument("--json", help="write the numbers as JSON here ('-': stdout)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    epoch_s = {k: v[3] for k, v in WORKLOADS.items()}
    for item in args.epoch_s:
        k, _, v = item.partition("=")
        epoch_s[k] = float(v)

    from tests.services import SeaweedS3

    work = Path(tempfile.mkdtemp(prefix="sprout-ckpt-bench-"))
    s3 = SeaweedS3(work / "weed", buckets=("bench",)).start()
    try:
        os.environ.update(s3.env())
        results: dict[str, Any] = {"target_stall_fraction": TARGET_STALL, "repeats": args.repeats, "workloads": {}}
        for w in [x.strip() for x in args.workloads.split(",") if x.strip()]:
            name, classes, ch, _, preset = WORKLOADS[w]
            every = checkpoint_every(preset)
            state = training_state(name, classes, ch)
            r = measure(state, "bench", work, args.repeats)
            med = {k: statistics.median(v) for k, v in r.items() if k.endswith("_s")}
            s3_save = med["s3_ray_save_s"]  # the path training takes to s3:// (see the docstring)
            local_save = med["local_ray_save_s"]  # the same path to a local storage.path
            worst_save = max(s3_save, local_save)
            r.update({f"median_{k}": v for k, v in med.items()}, epoch_s=epoch_s[w], preset=preset,
                     checkpoint_every=every, stall_fraction_s3_every_epoch=s3_save / epoch_s[w],
                     stall_fraction_local=local_save / (every * epoch_s[w]),
                     stall_fraction_s3=s3_save / (every * epoch_s[w]),
                     met=worst_save / (every * epoch_s[w]) <= TARGET_STALL)
            results["workloads"][w] = r
            del state
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "| model | checkpoint MB | save local s | save local via Ray copy s | save S3 s | save S3 via Ray upload s "
        "| S3 ÷ local (save) "
        "| load local s | load S3 s | S3 ÷ local (load) | epoch s | S3 (training path) stall, every epoch "
        "| preset, checkpoint_every | stall, local | stall, S3 | ≤ 5 % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w, r in results["workloads"].items():
        m = {k: r[f"median_{k}"] for k in ("local_save_s", "local_ray_save_s", "s3_save_s", "s3_ray_save_s", "local_load_s", "s3_load_s")}
        lines.append(
            f"| {w} | {r['bytes'] / 2**20:.1f} | {m['local_save_s']:.3f} | {m['local_ray_save_s']:.3f} | "
            f"{m['s3_save_s']:.3f} | "
            f"{m['s3_ray_save_s']:.3f} | {m['s3_save_s'] / m['local_save_s']:.2f} | {m['local_load_s']:.3f} | "
            f"{m['s3_load_s']:.3f} | {m['s3_load_s'] / m['local_load_s']:.2f} | {r['epoch_s']:g} | "
            f"{100 * r['stall_fraction_s3_every_epoch']:.2f} % | {r['preset']}, {r['checkpoint_every']} | "
            f"{100 * r['stall_fraction_local']:.2f} % | {100 * r['stall_fraction_s3']:.2f} % | "
            f"{'met' if r['met'] else 'NOT met'} |"
        )
    lines.append(f"(medians of {args.repeats}; S3 = weed mini on 127.0.0.1; stall = the training path's save ÷ "
                 "(checkpoint_every × epoch s), at the preset's checkpoint_every: the save to a local temporary "
                 "directory plus Ray's copy to storage.path (local) or upload (s3://); the direct saves are not on it)")
    return emit(results, "\n".join(lines), args.json)


if __name__ == "__main__":
    sys.exit(main())
