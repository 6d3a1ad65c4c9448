"""``DetectionDataModule``: boxed images from a source, few-shot selection, box-aware transforms."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from transferlab.data import splits
from transferlab.data.datamodule import SplitDataModule, _check_positive
from transferlab.data.det_dataset import DetectionDataset, detection_collate
from transferlab.data.det_transforms import create_det_eval_transform, create_det_train_transform
from transferlab.data.detection import DET_SOURCES, DetSourceOptions, load_det_source
from transferlab.data.splits import check_fractions
from transferlab.data.transforms import resolve_data_config
from transferlab.errors import UserError

log = logging.getLogger(__name__)

DET_AUGMENTS = ("none", "basic")
DEFAULT_SCALE = (0.5, 1.0)
DEFAULT_HFLIP = 0.5


def sample_images_per_class(
    labels: Sequence[np.ndarray],
    indices: np.ndarray,
    *,
    seed: int,
    per_class: int,
    class_names: tuple[str, ...] = (),
) -> np.ndarray:
    """Images of ``indices`` until every class is in ``per_class`` of them (or all it has).

    Walks a seeded shuffle of ``indices`` and keeps an image when one of its classes is still
    in fewer than ``per_class`` kept images, so frequent classes may end up in more; images
    without boxes are never kept.
    """
    order = np.random.default_rng([seed, splits.TRAIN]).permutation(
        np.asarray(indices, dtype=np.int64)
    )
    wanted = set(range(1, len(class_names))) or {int(c) for i in order for c in labels[int(i)]}
    counts: Counter[int] = Counter()
    chosen = []
    for index in order:
        classes = {int(c) for c in labels[int(index)]}
        if any(counts[c] < per_class for c in classes):
            chosen.append(int(index))
            counts.update(classes)
            if all(counts[c] >= per_class for c in wanted):
                break
    short = [c for c in sorted(wanted) if counts[c] < per_class]
    if short:
        named = [f"{class_names[c] if c < len(class_names) else c} ({counts[c]})" for c in short]
        log.warning(
            "images_per_class=%d exceeds what class(es) have, using all of them: %s",
            per_class,
            ", ".join(named),
        )
    return np.sort(np.asarray(chosen, dtype=np.int64))


class DetectionDataModule(SplitDataModule):
    """Loads a detection source once and serves ``{image, target}`` batches.

    Few-shot: ``train_images`` keeps the first N training images of a seeded order;
    ``images_per_class`` N keeps images until every class appears in N of them
    (``sample_images_per_class``); ``samples_per_class`` is the same, by the name that
    classification's sweeps use. Loaders collate with ``detection_collate``:
    ``{"image": [B, 3, S, S], "target": [B dicts]}``.
    """

    collate_fn = staticmethod(detection_collate)
    task = "detection"
    sources = DET_SOURCES  # the registry: sources registered later count too
    augments = DET_AUGMENTS

    def __init__(
        self,
        source: str,
        root: str | None = None,
        annotations: str | None = None,
        images: str | None = None,
        val_annotations: str | None = None,
        val_images: str | None = None,
        test_annotations: str | None = None,
        test_images: str | None = None,
        train_images: int | None = None,
        images_per_class: int | None = None,
        samples_per_class: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        strict: bool = True,
        image_size: int = 128,
        batch_size: int = 16,
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
        for key, value in (
            ("train_images", train_images),
            ("images_per_class", images_per_class),
            ("samples_per_class", samples_per_class),
        ):
            _check_positive(key, value)
        if images_per_class is not None and samples_per_class is not None:
            raise UserError(
                f"data.images_per_class={images_per_class} and data.samples_per_class="
                f"{samples_per_class} mean the same: set one of them"
            )
        per_class = images_per_class if images_per_class is not None else samples_per_class
        if per_class is not None and train_images is not None:
            raise UserError(
                f"data.train_images={train_images} and data.images_per_class={per_class} both "
                "choose the training images: set one of them"
            )
        if not isinstance(strict, bool):
            raise UserError(f"data.strict={strict!r} must be true or false")
        val_fraction, test_fraction = check_fractions(val_fraction, test_fraction)
        self.train_images = None if train_images is None else int(train_images)
        self.images_per_class = None if per_class is None else int(per_class)
        self.data_config = resolve_data_config(data_config, image_size)
        size = int(self.data_config["input_size"][1])
        self.options = DetSourceOptions(
            root=root,
            annotations=annotations,
            images=images,
            val_annotations=val_annotations,
            val_images=val_images,
            test_annotations=test_annotations,
            test_images=test_images,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            strict=strict,
            image_size=size,
            seed=self.seed,
            download=bool(download),
        )
        mean, std = self.data_config["mean"], self.data_config["std"]
        self.eval_transform = create_det_eval_transform(size, mean, std)
        if self.augment_name == "basic":
            scale = _scale(self.augment.get("scale", DEFAULT_SCALE))
            hflip = float(self.augment.get("hflip", DEFAULT_HFLIP))
            if not 0 <= hflip <= 1:
                raise UserError(f"augment.hflip={hflip} must be a probability in [0, 1]")
            self.train_transform = create_det_train_transform(size, mean, std, hflip, scale)
        else:
            self.train_transform = create_det_train_transform(size, mean, std, 0.0, None)

    def setup(self, stage: str | None = None) -> None:
        """Load the source and select the images of every split; runs once."""
        if self.train_set is not None:
            return
        train, val, test, names = load_det_source(self.source, self.options)
        pool = np.arange(len(train), dtype=np.int64)
        if self.images_per_class is not None:
            chosen = sample_images_per_class(
                train.labels,
                pool,
                seed=self.seed,
                per_class=self.images_per_class,
                class_names=tuple(names),
            )
        else:
            chosen = np.random.default_rng(self.seed).permutation(pool)
            if self.train_images is not None:
                chosen = chosen[: self.train_images]
            chosen = np.sort(chosen)
        for split, images, fix in (
            ("training", chosen, "add annotated images or raise data.images_per_class"),
            ("validation", val, "add images or raise data.val_fraction"),
            ("test", test, "add images or raise data.test_fraction"),
        ):
            if len(images) == 0:
                raise UserError(f"the {split} set of data.source={self.source} is empty: {fix}")
        self.class_names = tuple(names)
        self.train_set = DetectionDataset(train, chosen, self.train_transform)
        self.val_set = DetectionDataset(val, np.arange(len(val)), self.eval_transform)
        self.test_set = DetectionDataset(test, np.arange(len(test)), self.eval_transform)
        log.info("data: %s", self.summary())

    def summary(self) -> dict[str, Any]:
        """The split summary, and the number of training boxes."""
        return {**super().summary(), "train_boxes": self.train_set.box_count()}


def _scale(value: Any) -> tuple[float, float]:
    """``augment.scale`` as (low, high) shares of the image's area, checked."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        low, high = -1.0, -1.0
    if not 0 < low <= high <= 1:
        raise UserError(
            f"augment.scale={value!r} must be [low, high] with 0 < low <= high <= 1 "
            "(the crop's share of the image's area)"
        )
    return low, high
