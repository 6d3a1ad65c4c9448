"""``IdentityDataModule``: images of people (or stand-ins), split by identity, for
``task=embedding``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transferlab.data.datamodule import SplitDataModule, _check_positive
from transferlab.data.datasets import ImageDataset
from transferlab.data.identities import IDENTITY_SOURCES, split_identities
from transferlab.data.transforms import (
    create_eval_transform,
    create_train_transform,
    image_mode,
    resolve_data_config,
)


class IdentityDataModule(SplitDataModule):
    """Serves ``{image, label}`` batches whose labels are identities.

    ``class_names`` are the training identities (what the losses classify); validation and
    test identities come after them in ``identity_names`` and never appear in training.
    """

    task = "embedding"
    sources = tuple(IDENTITY_SOURCES)
    augments = ("none", "basic", "randaugment")

    def __init__(
        self,
        source: str,
        root: str | None = None,
        images_per_identity: int | None = None,
        min_images_per_identity: int = 2,
        val_identities: int | float | None = None,
        test_identities: int | float = 0.2,
        image_size: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | str = 0,
        pin_memory: bool | str = False,
        seed: int = 0,
        data_config: Mapping[str, Any] | None = None,
        augment: Mapping[str, Any] | None = None,
        download: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, seed)
        self._choose_source_and_augment(source, augment)
        _check_positive("images_per_identity", images_per_identity)
        self.root = root
        self.images_per_identity = images_per_identity
        self.min_images_per_identity = min_images_per_identity
        self.val_identities, self.test_identities = val_identities, test_identities
        self.download = bool(download)
        self.data_config = resolve_data_config(data_config, image_size)
        self.image_mode = image_mode(self.data_config)
        self.eval_transform = create_eval_transform(self.data_config)
        self.train_transform = create_train_transform(self.data_config, self.augment)
        self.identity_names: tuple[str, ...] = ()

    def setup(self, stage: str | None = None) -> None:
        """Load the source and split it by identity; runs once."""
        if self.train_set is not None:
            return
        folder = Path(self.root).expanduser() if self.root not in (None, "") else None
        images, names = IDENTITY_SOURCES[self.source](folder, download=self.download)
        split = split_identities(
            images.labels,
            names,
            seed=self.seed,
            min_images=self.min_images_per_identity,
            images_per_identity=self.images_per_identity,
            val_identities=self.val_identities,
            test_identities=self.test_identities,
            where=f"data.root={folder}" if folder else f"data={self.source}",
        )
        relabelled = dataclasses.replace(images, labels=split.labels)
        self.identity_names = split.names
        self.class_names = split.names[: split.num_train]
        mode = self.image_mode
        self.train_set = ImageDataset(relabelled, split.train, self.train_transform, mode)
        self.val_set = ImageDataset(relabelled, split.val, self.eval_transform, mode)
        self.test_set = ImageDataset(relabelled, split.test, self.eval_transform, mode)

    def summary(self) -> dict[str, Any]:
        """The base summary plus the identities of each split (``num_classes``: training's)."""
        return {
            **super().summary(),
            **{
                f"{split}_identities": len(set(dataset.labels.tolist()))
                for split, dataset in (("val", self.val_set), ("test", self.test_set))
            },
        }
