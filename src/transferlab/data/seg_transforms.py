"""Paired transforms for segmentation: the mask follows every geometric step of the image.

Built from torchvision's transforms v2 on ``tv_tensors.Image`` and ``tv_tensors.Mask``, so one
set of random parameters moves both; ``Normalize`` and the float conversion leave masks
untouched. Masks are resized by pixel-centre nearest neighbour (``NEAREST_EXACT``): v2's own
mask resize (``NEAREST``, ``floor(x * scale)``) sits up to half an output pixel up-left of the
bilinear image, a shift that mislabels object edges. Class indices are never blended or scaled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F


class SegTransform:
    """``(PIL image, (H, W) mask)`` to ``(float32 3xHxW normalized image, int64 HxW mask)``."""

    def __init__(self, steps: Sequence[v2.Transform]) -> None:
        self.pipeline = v2.Compose(list(steps))

    def __call__(
        self, image: Image.Image, mask: np.ndarray | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = tv_tensors.Image(F.pil_to_tensor(image.convert("RGB")))
        labels = tv_tensors.Mask(torch.as_tensor(np.asarray(mask), dtype=torch.int64))
        if labels.shape != pixels.shape[1:]:
            raise ValueError(f"mask {tuple(labels.shape)} does not match image {pixels.shape[1:]}")
        out_image, out_mask = self.pipeline(pixels, labels)
        return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor)

    def image_only(self, image: Image.Image) -> torch.Tensor:
        """The transformed ``image`` alone, as for prediction (a blank mask goes along)."""
        return self(image, np.zeros((image.height, image.width), dtype=np.uint8))[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline})"


def resize_mask_exact(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """An (H, W) mask resized to ``size`` by pixel-centre nearest neighbour, aligned with bilinear."""
    plain = mask.as_subclass(torch.Tensor)[None]
    out = F.resize_image(plain, list(size), interpolation=InterpolationMode.NEAREST_EXACT)
    return tv_tensors.wrap(out[0], like=mask) if isinstance(mask, tv_tensors.Mask) else out[0]


class AlignedResize(v2.Resize):
    """``v2.Resize`` to a fixed (H, W), masks by pixel-centre nearest neighbour."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return resize_mask_exact(inpt, self.size)
        return super().transform(inpt, params)


class AlignedRandomResizedCrop(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop``, masks by pixel-centre nearest neighbour."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            box = (params["top"], params["left"], params["height"], params["width"])
            return resize_mask_exact(F.crop(inpt, *box), self.size)
        return super().transform(inpt, params)


def _to_normalized(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """uint8 image to float 0-1, then normalized; masks pass through both unchanged."""
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize([float(m) for m in mean], [float(s) for s in std]),
    ]


def create_seg_eval_transform(
    size: int, mean: Sequence[float], std: Sequence[float]
) -> SegTransform:
    """Resize to ``size`` x ``size`` (image bilinear, mask nearest), then normalize the image."""
    resize = AlignedResize((int(size), int(size)), InterpolationMode.BILINEAR, antialias=True)
    return SegTransform([resize, *_to_normalized(mean, std)])


def create_seg_train_transform(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.5, 1.0),
) -> SegTransform:
    """Random resized crop and horizontal flip, the same for image and mask, then normalize."""
    crop = AlignedRandomResizedCrop(
        (int(size), int(size)),
        scale=tuple(scale),
        interpolation=InterpolationMode.BILINEAR,
        antialias=True,
    )
    return SegTransform([crop, v2.RandomHorizontalFlip(float(hflip)), *_to_normalized(mean, std)])


class ImageOnly(v2.Transform):
    """A PIL-image step (a corruption) applied to the image alone; masks pass unchanged."""

    def __init__(self, step: Any) -> None:
        super().__init__()
        self.step = step

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask) or not isinstance(inpt, tv_tensors.Image):
            return inpt
        changed = self.step(F.to_pil_image(inpt.as_subclass(torch.Tensor)))
        return tv_tensors.Image(F.pil_to_tensor(changed))


def with_image_step(transform: Any, step: Any) -> Any:
    """A paired ``transform`` (``SegTransform``, ``DetTransform``: built from a list of v2
    steps) with ``step`` on the image alone right after its first (resizing) step, before
    the float conversion and normalisation. Masks and boxes pass ``step`` unchanged, so only
    photometric steps keep them true."""
    steps = list(transform.pipeline.transforms)
    return type(transform)([steps[0], ImageOnly(step), *steps[1:]])
