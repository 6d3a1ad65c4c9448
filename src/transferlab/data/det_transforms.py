"""Box-aware transforms for detection: the boxes follow every geometric step of the image.

Built from torchvision's transforms v2 on ``tv_tensors.Image`` and ``tv_tensors.BoundingBoxes``
(XYXY, in pixels of the image's canvas), so one set of random parameters moves both. Boxes a
crop pushed (partly) out of the image are clipped to it; boxes left under 1 px wide or high
are dropped with their labels and crowd flags (``SanitizeBoundingBoxes``) in training, where
torchvision's detectors reject degenerate boxes. Evaluation keeps every box.
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

Target = dict[str, torch.Tensor]


class DetTransform:
    """``(PIL image, [N, 4] xyxy boxes, [N] labels, [N] crowd flags)`` to a float32 3xHxW
    normalized image and ``{"boxes": float32 [M, 4], "labels": int64 [M], "iscrowd": int64 [M]}``
    in the output image's pixels (M <= N: boxes a training crop removed are dropped)."""

    def __init__(self, steps: Sequence[v2.Transform]) -> None:
        self.pipeline = v2.Compose(list(steps))

    def __call__(
        self,
        image: Image.Image,
        boxes: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        iscrowd: np.ndarray | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Target]:
        pixels = tv_tensors.Image(F.pil_to_tensor(image.convert("RGB")))
        box_values = torch.as_tensor(np.asarray(boxes), dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                box_values,
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=tuple(pixels.shape[1:]),
                clamping_mode="hard",
            ),
            "labels": torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1),
            "iscrowd": torch.zeros(len(box_values), dtype=torch.int64)
            if iscrowd is None
            else torch.as_tensor(np.asarray(iscrowd), dtype=torch.int64).reshape(-1),
        }
        if not len(target["labels"]) == len(target["iscrowd"]) == len(box_values):
            raise ValueError(
                f"{len(box_values)} boxes, {len(target['labels'])} labels and "
                f"{len(target['iscrowd'])} crowd flags"
            )
        out_image, out_target = self.pipeline(pixels, target)
        return out_image.as_subclass(torch.Tensor), {
            key: value.as_subclass(torch.Tensor) for key, value in out_target.items()
        }

    def image_only(self, image: Image.Image) -> torch.Tensor:
        """The transformed ``image`` alone, as for prediction (no boxes go along)."""
        return self(image, np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.int64))[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline})"


def target_parts(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``SanitizeBoundingBoxes`` drops along with the boxes: labels and crowd flags."""
    target = inputs[1]
    return target["labels"], target["iscrowd"]


def _sanitized() -> list[v2.Transform]:
    """Clip boxes to the image, then drop those under 1 px with their labels and flags."""
    return [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1, labels_getter=target_parts),
    ]


def _to_normalized(mean: Sequence[float], std: Sequence[float]) -> list[v2.Transform]:
    """uint8 image to float 0-1, then normalized; boxes pass through both unchanged."""
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize([float(m) for m in mean], [float(s) for s in std]),
    ]


def _resize(size: int) -> v2.Transform:
    return v2.Resize((int(size), int(size)), InterpolationMode.BILINEAR, antialias=True)


def create_det_eval_transform(
    size: int, mean: Sequence[float], std: Sequence[float]
) -> DetTransform:
    """Resize to ``size`` x ``size`` (boxes scaled alike), then normalize; every box kept."""
    return DetTransform([_resize(size), *_to_normalized(mean, std)])


def create_det_train_transform(
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    hflip: float = 0.5,
    scale: tuple[float, float] | None = (0.5, 1.0),
) -> DetTransform:
    """Random resized crop (``scale``: the crop's share of the image's area) and horizontal
    flip, the same for image and boxes; boxes under 1 px dropped; then normalize.

    ``scale=None`` and ``hflip=0`` give the evaluation resize with degenerate boxes dropped
    (training without augmentation).
    """
    steps: list[v2.Transform] = []
    if scale is None:
        steps.append(_resize(size))
    else:
        low, high = (float(v) for v in scale)
        steps.append(
            v2.RandomResizedCrop(
                (int(size), int(size)),
                scale=(low, high),
                interpolation=InterpolationMode.BILINEAR,
                antialias=True,
            )
        )
    if float(hflip) > 0:
        steps.append(v2.RandomHorizontalFlip(float(hflip)))
    return DetTransform([*steps, *_sanitized(), *_to_normalized(mean, std)])
