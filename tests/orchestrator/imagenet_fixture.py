"""A tiny ImageNet-layout folder of real JPEGs (3 classes × 4 images, one corrupt file)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("n01440764", "n02102040", "n03000684")
SIZES = ((64, 48), (40, 90), (120, 80), (75, 75))  # (width, height): portrait, landscape, square
CORRUPT = "train/n02102040/n02102040_truncated.JPEG"


def jpeg_bytes(width: int, height: int, seed: int, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, np.full_like(xx, 40 * (seed % 6))], -1)
    img = np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    pil = Image.fromarray(img)
    if mode != "RGB":
        pil = pil.convert(mode)  # ImageNet has grayscale and CMYK JPEGs among the RGB ones
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_imagenet(root: Path, *, flat_val: bool = False, corrupt: bool = True) -> dict[str, int]:
    """Write the folder; returns {relative path: label} of every decodable image."""
    labels: dict[str, int] = {}
    for c, wnid in enumerate(CLASSES):
        d = root / "train" / wnid
        d.mkdir(parents=True)
        for i, (w, h) in enumerate(SIZES):
            mode = {(0, 1): "L", (2, 2): "CMYK"}.get((c, i), "RGB")
            rel = f"train/{wnid}/{wnid}_{i}.JPEG"
            (root / rel).write_bytes(jpeg_bytes(w, h, seed=10 * c + i, mode=mode))
            labels[rel] = c
    if corrupt:
        good = jpeg_bytes(80, 60, seed=99)
        (root / CORRUPT).write_bytes(good[: len(good) // 2])  # truncated mid-scan
    (root / "val").mkdir()
    lines = []
    for c, wnid in enumerate(CLASSES):
        name = f"ILSVRC2012_val_{c + 1:08d}.JPEG"
        rel = f"val/{name}" if flat_val else f"val/{wnid}/{name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(jpeg_bytes(70, 50, seed=100 + c))
        labels[rel] = c
        lines.append(f"{Path(name).stem},{wnid} 1 2 30 40")
    if flat_val:
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(lines) + "\n")
    return labels
