"""``TransferDataModule``: a data source, seeded splits, few-shot sampling and the backbone's transforms."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from transferlab.data import splits
from transferlab.data.datasets import ImageDataset
from transferlab.data.samplers import epoch_loader, eval_loader
from transferlab.data.sources import ImageSet, load_source
from transferlab.data.transforms import (
    augment_name,
    create_eval_transform,
    create_train_transform,
    image_mode,
    resolve_data_config,
)
from transferlab.errors import UserError
from transferlab.machine import Setting, usable_cores

log = logging.getLogger(__name__)

# A carved test set does not move with the run seed, so runs with different seeds are
# evaluated on the same images (only the train/val selection varies).
TEST_SPLIT_SEED = 0


class SplitDataModule(pl.LightningDataModule):
    """What every task's data module shares: batch sizes, loaders, the fingerprint.

    A subclass's ``setup()`` fills ``class_names`` and ``train_set``, ``val_set`` and
    ``test_set`` (datasets with ``images`` and ``indices``, whose images can
    ``update_hash``); ``source``, ``data_config`` and ``augment_name`` are set at construction.
    """

    # How a loader's samples become a batch; None: PyTorch's default (stacked tensors).
    collate_fn: Callable[[list[Any]], Any] | None = None
    # The task these data serve, its sources (empty: not checked here) and augmentations.
    task: ClassVar[str] = ""
    sources: ClassVar[Collection[str]] = ()
    augments: ClassVar[tuple[str, ...]] = ("none",)

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int | str,
        pin_memory: bool | str,
        seed: int,
    ) -> None:
        super().__init__()
        _check_positive("batch_size", batch_size, allow_none=False)
        _check_positive("eval_batch_size", eval_batch_size)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or 2 * self.batch_size)
        self.num_workers = resolve_num_workers(num_workers)
        self.pin_memory = resolve_pin_memory(pin_memory)
        self._requested = {
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            "eval_batch_size": eval_batch_size,
        }
        self.seed = int(seed)
        self.start_epoch = 0  # the first training epoch (later when a run resumes)
        self.class_names: tuple[str, ...] = ()
        self.train_set: Any = None
        self.val_set: Any = None
        self.test_set: Any = None
        self._fingerprint: str | None = None

    @property
    def num_classes(self) -> int:
        self._require_setup()
        return len(self.class_names)

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return epoch_loader(
            self.train_set,
            self.batch_size,
            self.seed,
            self.start_epoch,
            drop_last=False,
            **self._loader_options(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def _eval_loader(self, dataset: ImageDataset | None) -> DataLoader:
        self._require_setup()
        return eval_loader(dataset, self.eval_batch_size, **self._loader_options())

    def _loader_options(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": self.pin_memory,
            "collate_fn": self.collate_fn,
        }

    def loader_settings(self) -> dict[str, Setting]:
        """The loader's speed settings, and why each value (``auto`` resolved here)."""
        cores = usable_cores()
        if self._requested["num_workers"] != "auto":
            workers_why = "data.num_workers"
        elif cores <= 2:
            workers_why = (
                f"auto: on {cores} cores the model's threads use them all, and loader "
                "processes only compete (measured)"
            )
        else:
            workers_why = f"auto: half of the {cores} cores, at most 8 (not measured here)"
        pin_why = (
            "auto: pinned only for a CUDA device"
            if self._requested["pin_memory"] == "auto"
            else "data.pin_memory"
        )
        batch_why = (
            "data.eval_batch_size"
            if self._requested["eval_batch_size"]
            else "twice data.batch_size (no gradients to keep)"
        )
        return {
            "num_workers": Setting(self.num_workers, workers_why),
            "pin_memory": Setting(self.pin_memory, pin_why),
            "eval_batch_size": Setting(self.eval_batch_size, batch_why),
        }

    def summary(self) -> dict[str, Any]:
        """Source, split sizes, classes, input size and augmentation, flat for logging."""
        self._require_setup()
        return {
            "source": self.source,
            "num_classes": len(self.class_names),
            "train_size": len(self.train_set),
            "val_size": len(self.val_set),
            "test_size": len(self.test_set),
            "input_size": "x".join(str(v) for v in self.data_config["input_size"]),
            "augment": self.augment_name,
        }

    def fingerprint(self) -> str:
        """A short sha256 of the class names and the selected samples of every split."""
        self._require_setup()
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update("\0".join(self.class_names).encode())
            for split, dataset in (
                ("train", self.train_set),
                ("val", self.val_set),
                ("test", self.test_set),
            ):
                digest.update(f"\0{split}\0".encode())
                dataset.images.update_hash(digest, dataset.indices)
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def _require_setup(self) -> None:
        if self.train_set is None:
            raise RuntimeError("TransferDataModule.setup() has not run yet")

    @classmethod
    def check_source(cls, source: Any) -> None:
        """A source this data module does not serve is one line naming those it does (no
        check where ``sources`` is empty)."""
        if cls.sources and source not in cls.sources:
            article = "an" if cls.task[:1] in ("a", "e", "i", "o", "u") else "a"
            raise UserError(
                f"data={source} is not {article} {cls.task} source: with task={cls.task} "
                f"choose data= from {', '.join(sorted(cls.sources))}"
            )

    def _choose_source_and_augment(self, source: str, augment: Mapping[str, Any] | None) -> None:
        """Set ``source``, ``augment`` and ``augment_name``, each checked against what this
        data module serves; either unknown is one line naming the choices."""
        self.check_source(source)
        self.source = source
        self.augment = dict(augment or {"name": "none"})
        self.augment_name = str(self.augment.get("name", "none"))
        if self.augment_name not in self.augments:
            raise UserError(
                f"augment={self.augment_name} is not available for {self.task}: choose "
                f"{', '.join(self.augments)}"
            )

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized image batches back to 0-1 RGB, for figures."""
        mean = torch.tensor(self.data_config["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(self.data_config["std"]).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)


class TransferDataModule(SplitDataModule):
    """Loads ``source`` once, selects the train/val/test samples, and serves them as loaders.

    Call ``setup()`` before building the model to learn ``num_classes``; later calls (Lightning's)
    reuse what was loaded.
    """

    def __init__(
        self,
        source: str,
        root: str | None = None,
        samples_per_class: int | None = None,
        val_per_class: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | str = 0,
        pin_memory: bool | str = False,
        seed: int = 0,
        image_size: int | None = None,
        data_config: Mapping[str, Any] | None = None,
        augment: Mapping[str, Any] | None = None,
        download: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, seed)
        _check_positive("samples_per_class", samples_per_class)
        _check_positive("val_per_class", val_per_class)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= float(value) < 1.0:
                raise UserError(f"data.{name}={value} must be in [0, 1)")
        self.source = source
        self.root = root
        self.samples_per_class = samples_per_class
        self.val_per_class = val_per_class
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.download = bool(download)
        self.data_config = resolve_data_config(data_config, image_size)
        self.augment = dict(augment or {"name": "none"})
        self.augment_name = augment_name(self.augment)
        self.image_mode = image_mode(self.data_config)
        self.eval_transform = create_eval_transform(self.data_config)
        self.train_transform = create_train_transform(self.data_config, self.augment)

    def setup(self, stage: str | None = None) -> None:
        """Load the source and select the samples of every split; runs once, whatever the stage."""
        if self.train_set is not None:
            return
        raw = load_source(self.source, root=self.root, download=self.download)
        names = raw.class_names
        labels = raw.train.labels
        pool = np.arange(len(raw.train), dtype=np.int64)

        test_images: ImageSet = raw.test if raw.test is not None else raw.train
        if raw.test is not None:
            test_indices = np.arange(len(raw.test), dtype=np.int64)
        else:
            test_indices, pool = splits.carve_stratified(
                labels, pool, seed=TEST_SPLIT_SEED, purpose=splits.TEST, fraction=self.test_fraction
            )

        val_images: ImageSet = raw.val if raw.val is not None else raw.train
        if raw.val is not None:
            val_indices = np.arange(len(raw.val), dtype=np.int64)
        else:
            val_indices, pool = splits.carve_stratified(
                labels,
                pool,
                seed=self.seed,
                purpose=splits.VAL,
                fraction=self.val_fraction,
                per_class=self.val_per_class,
                class_names=names,
            )

        train_indices = pool
        if self.samples_per_class is not None:
            train_indices = splits.sample_per_class(
                labels, pool, seed=self.seed, per_class=self.samples_per_class, class_names=names
            )

        for split, indices, fix in (
            ("validation", val_indices, "set data.val_fraction > 0 or data.val_per_class"),
            ("test", test_indices, "set data.test_fraction > 0"),
            ("training", train_indices, "add images or lower data.val_fraction"),
        ):
            if len(indices) == 0:
                raise UserError(f"the {split} set of data.source={self.source} is empty: {fix}")

        mode = self.image_mode
        self.class_names = tuple(names)
        self.val_set = ImageDataset(val_images, val_indices, self.eval_transform, mode)
        self.test_set = ImageDataset(test_images, test_indices, self.eval_transform, mode)
        self.train_set = ImageDataset(raw.train, train_indices, self.train_transform, mode)
        log.info("data: %s", self.summary())


def resolve_num_workers(value: int | str) -> int:
    """``auto``: no loader processes on 2 cores or fewer, where the model's threads use every
    core and a worker only competes with them (docs/performance.md); else half the cores, up
    to 8. An integer is taken as given."""
    if value == "auto":
        cores = usable_cores()
        return 0 if cores <= 2 else min(8, cores // 2)
    try:
        workers = int(value)
    except (TypeError, ValueError):
        workers = -1
    if workers < 0:
        raise UserError(f"data.num_workers={value!r} must be 'auto' or a number, 0 or more")
    return workers


def resolve_pin_memory(value: bool | str) -> bool:
    """``auto``: pin batches in page-locked memory only when a CUDA device will take them."""
    if value == "auto":
        return torch.cuda.is_available()
    if not isinstance(value, bool):
        raise UserError(f"data.pin_memory={value!r} must be 'auto', true or false")
    return value


def _check_positive(name: str, value: int | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or int(value) < 1:
        raise UserError(f"data.{name}={value} must be a positive integer")
