"""Models; each starts with its own normalisation layer, so inputs are images in [0, 1]."""

from trainables.models import resnets, small, vgg  # noqa: F401  (register)
from trainables.models.common import Normalize, Normalized

__all__ = ["Normalize", "Normalized"]
