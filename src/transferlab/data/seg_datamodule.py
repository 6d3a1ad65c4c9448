"""``SegmentationDataModule``: image/mask pairs from a source, seeded splits, paired transforms."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from transferlab.data.datamodule import SplitDataModule, _check_positive
from transferlab.data.seg_dataset import SegmentationDataset
from transferlab.data.seg_transforms import create_seg_eval_transform, create_seg_train_transform
from transferlab.data.segmentation import IGNORE_INDEX, fmnist_scenes, seg_folder
from transferlab.data.splits import check_fractions
from transferlab.data.transforms import resolve_data_config
from transferlab.errors import UserError

SEG_SOURCES = ("fmnist_scenes", "seg_folder")
SEG_AUGMENTS = ("none", "basic")


class SegmentationDataModule(SplitDataModule):
    """Loads a segmentation source once and serves ``{image, mask}`` batches.

    ``train_images`` keeps the first N training scenes (a seeded order), for few-shot and
    data-efficiency runs; ``samples_per_class`` N means N images per object class (N times
    the classes other than background), so sweeps written for classification apply as is.
    """

    task = "segmentation"
    sources = SEG_SOURCES
    augments = SEG_AUGMENTS

    def __init__(
        self,
        source: str,
        root: str | None = None,
        train_images: int | None = None,
        samples_per_class: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        image_size: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int | str = 0,
        pin_memory: bool | str = False,
        seed: int = 0,
        data_config: Mapping[str, Any] | None = None,
        augment: Mapping[str, Any] | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, seed)
        self._choose_source_and_augment(source, augment)
        _check_positive("train_images", train_images)
        _check_positive("samples_per_class", samples_per_class)
        self.root = root
        self.train_images, self.samples_per_class = train_images, samples_per_class
        self.val_fraction, self.test_fraction = check_fractions(val_fraction, test_fraction)
        self.ignore_index = int(ignore_index)
        self.data_config = resolve_data_config(data_config, image_size)
        size = int(self.data_config["input_size"][1])
        mean, std = self.data_config["mean"], self.data_config["std"]
        self.eval_transform = create_seg_eval_transform(size, mean, std)
        self.train_transform = (
            create_seg_train_transform(size, mean, std)
            if self.augment_name == "basic"
            else self.eval_transform
        )

    def setup(self, stage: str | None = None) -> None:
        """Load the source and select the images of every split; runs once."""
        if self.train_set is not None:
            return
        size = int(self.data_config["input_size"][1])
        if self.source == "fmnist_scenes":
            train, val, test, names = fmnist_scenes(seed=0, size=size)
        else:
            if not self.root:
                raise UserError("data=seg_folder needs data.root=DIR (with images/ and masks/)")
            train, val, test, names = seg_folder(
                self.root,
                split_seed=self.seed,
                val_fraction=self.val_fraction,
                test_fraction=self.test_fraction,
            )
        order = np.random.default_rng(self.seed).permutation(len(train))
        keep = self.train_images
        if self.samples_per_class is not None:
            keep = self.samples_per_class * max(1, len(names) - 1)
        if keep is not None:
            order = order[: min(int(keep), len(order))]
        self.class_names = tuple(names)
        self.train_set = SegmentationDataset(train, np.sort(order), self.train_transform)
        self.val_set = SegmentationDataset(val, np.arange(len(val)), self.eval_transform)
        self.test_set = SegmentationDataset(test, np.arange(len(test)), self.eval_transform)
