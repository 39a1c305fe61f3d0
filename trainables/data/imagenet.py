"""ImageNet as an ImageFolder (``<root>/train/<wnid>/*.JPEG``, ``<root>/val/<wnid>/*.JPEG``).

Training: RandomResizedCrop(224) + flip; evaluation: resize 256 + centre crop 224 (the
standard ResNet recipe). ``val`` is held out from ``train`` with the run's seed;
``test`` is the official validation folder. Parquet shards from ``sprout prepare-data``
are streamed by Ray Data instead (``data.format: parquet``).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, Subset

from trainables.data.base import DataError, DataInfo, check_split, select
from trainables.models.resnets import IMAGENET_MEAN, IMAGENET_STD
from trainables.registry import DATASETS

LAYOUT = "<root>/train/<class>/<image> and <root>/val/<class>/<image> (ImageFolder layout)"


def imagenet_transform(train: bool, image_size: int = 224):
    from torchvision import transforms as T

    if train:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor()])
    return T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor()])


def load_rgb(path: str):
    """Decode one image file to RGB; an unreadable file is a DataError naming it."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except OSError as e:  # includes PIL.UnidentifiedImageError and truncated files
        raise DataError(f"ImageNet image {path} could not be decoded ({e}); expected JPEG/PNG files in {LAYOUT}") from None


@DATASETS.register("imagenet")
def imagenet(
    root: str | None = None,
    split: str = "train",
    seed: int = 0,
    val_fraction: float = 0.01,
    image_size: int = 224,
    **_: object,
) -> Dataset:
    check_split(split)
    if root is None:
        raise DataError(f"data.root is required for imagenet; expected {LAYOUT}")
    folder = Path(root).expanduser() / ("val" if split == "test" else "train")
    if not folder.is_dir():
        raise DataError(f"ImageNet folder not found: {folder}; expected {LAYOUT}")
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(str(folder), transform=imagenet_transform(split == "train", image_size), loader=load_rgb)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"ImageNet folder {folder} is malformed: {e}; expected {LAYOUT}") from None
    info = DataInfo(len(ds.classes), 3, image_size, IMAGENET_MEAN, IMAGENET_STD, tuple(ds.classes))
    if split != "test":
        ds = Subset(ds, select(split, len(ds), val_fraction, seed).tolist())
    ds.info = info  # type: ignore[attr-defined]
    return ds
