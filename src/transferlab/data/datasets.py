"""The torch Dataset over a selection of an image set, with mode conversion and a transform."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from transferlab.data.sources import IMAGE_ERRORS, ImageSet, UnreadableImageError, _one_line


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit int and float grayscale to 8-bit ``L``, scaled rather than clipped."""
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max(initial=0) > 255):
        pixels = pixels / 257.0
    elif image.mode == "F" and pixels.max(initial=0) <= 1.0:
        pixels = pixels * 255.0
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image (L, RGB, RGBA, P, CMYK, I;16, ...) to ``mode`` (``RGB`` or ``L``)."""
    if image.mode == mode:
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert(mode)


def decode_rgb(path: Path) -> Image.Image:
    """The image file at ``path`` decoded to RGB as stored (no EXIF rotation: masks and boxes
    are drawn on the stored pixels); a file PIL cannot read is one line naming it."""
    try:
        with Image.open(path) as image:
            rgb = to_mode(image, "RGB")
            rgb.load()
    except IMAGE_ERRORS as exc:
        raise UnreadableImageError(
            f"cannot decode image {path} ({type(exc).__name__}: {_one_line(exc)}): "
            "remove or replace it"
        ) from exc
    return rgb


class ImageDataset(torch.utils.data.Dataset):
    """The images at ``indices`` of ``images``, converted and transformed: ``{image, label}``."""

    def __init__(
        self,
        images: ImageSet,
        indices: np.ndarray,
        transform: Callable[[Image.Image], Any],
        mode: str = "RGB",
    ) -> None:
        self.images = images
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        source_index = int(self.indices[index])
        image = to_mode(self.images.load(source_index), self.mode)
        return {"image": self.transform(image), "label": int(self.images.labels[source_index])}

    @property
    def labels(self) -> np.ndarray:
        """The label of every sample, in dataset order."""
        return self.images.labels[self.indices]
