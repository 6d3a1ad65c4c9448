"""The torch Dataset over a selection of a ``BoxedImages`` set: ``{image, target}`` samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from transferlab.data.det_transforms import DetTransform
from transferlab.data.detection import BoxedImages


class DetectionDataset(torch.utils.data.Dataset):
    """The images at ``indices`` of ``images`` with their boxes, through a box-aware ``transform``.

    Samples are ``{"image": float32 [3, H, W], "target": {"boxes": float32 [N, 4] xyxy pixels,
    "labels": int64 [N] (1..C), "iscrowd": int64 [N], "image_id": int}}``, torchvision's
    detection convention; ``detection_collate`` batches them.
    """

    def __init__(self, images: BoxedImages, indices: np.ndarray, transform: DetTransform) -> None:
        self.images = images
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = int(self.indices[index])
        image, boxes, labels = self.images.load(position)
        pixels, target = self.transform(image, boxes, labels, self.images.crowd(position))
        target["image_id"] = int(self.images.image_ids[position])
        return {"image": pixels, "target": target}

    def box_count(self) -> int:
        """How many boxes the selected images hold (before any transform)."""
        return int(sum(len(self.images.labels[int(i)]) for i in self.indices))


def detection_collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"image": [B, 3, H, W] stacked, "target": [B target dicts]}`` (images of one size)."""
    return {
        "image": torch.stack([sample["image"] for sample in samples]),
        "target": [sample["target"] for sample in samples],
    }
