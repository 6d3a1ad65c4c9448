"""The torch Dataset over a selection of a ``MaskedImages`` set: ``{image, mask}`` samples."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from transferlab.data.segmentation import MaskedImages

PairTransform = Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


class SegmentationDataset(torch.utils.data.Dataset):
    """The image/mask pairs at ``indices`` of ``images``, through a paired ``transform``.

    Samples are ``{"image": float32 [3, H, W], "mask": int64 [H, W]}``; the default collate
    stacks them into ``{"image": [B, 3, H, W], "mask": [B, H, W]}``.
    """

    def __init__(self, images: MaskedImages, indices: np.ndarray, transform: PairTransform) -> None:
        self.images = images
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, mask = self.images.load(int(self.indices[index]))
        image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask.long()}
