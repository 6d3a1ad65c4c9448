"""Identities for ``task=embedding``: which person's images go to which split, so that the
validation and test identities are never trained on (open-set evaluation).

A source gives images and one identity label per image: ``identity_folder`` reads
``root/<identity>/*.jpg`` (the LFW layout), and offline ``fmnist_identities`` lets
Fashion-MNIST's ten classes stand in for ten people. ``split_identities`` then keeps the
identities with enough images, samples up to ``images_per_identity`` of each, and holds
whole identities out for test and validation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferlab.data.sources import (
    FileImages,
    ImageSet,
    _is_image_file,
    _subfolders,
    check_image_headers,
    load_source,
)
from transferlab.data.splits import TEST, TRAIN, VAL
from transferlab.errors import UserError

log = logging.getLogger(__name__)

# Test identities and the per-identity samples do not move with the run seed, so runs with
# different seeds are tested on the same people and images (as data.datamodule's test split).
TEST_SPLIT_SEED = 0
# Verification needs a positive pair (two images of one identity) and a negative pair (two
# identities) in each split, and the margin losses at least two identities to tell apart.
MIN_IDENTITIES_PER_SPLIT = 2


def identity_folder(root: Path | None, download: bool = True) -> tuple[ImageSet, tuple[str, ...]]:
    """``root/<identity>/**/*.jpg``: the images and each one's identity (folder names)."""
    if root is None or not root.is_dir():
        where = "" if root is None else f" ({root} does not exist)"
        raise UserError(
            f"data=identity_folder needs data.root=DIR{where}: a folder with one sub-folder of "
            "images per person, DIR/<identity>/*.jpg"
        )
    folders = _subfolders(root)
    paths: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if _is_image_file(p))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise UserError(
            f"data.root={root} has no images in identity sub-folders: put each person's "
            f"images in {root}/<identity>/*.jpg"
        )
    check_image_headers(paths)
    names = tuple(folder.name for folder in folders)
    return FileImages(tuple(paths), np.asarray(labels, dtype=np.int64), root), names


def fmnist_identities(root: Path | None, download: bool = True) -> tuple[ImageSet, tuple[str, ...]]:
    """Fashion-MNIST's 60,000 training images, its ten classes as identities."""
    raw = load_source("fashion_mnist", root=root, download=download)
    return raw.train, raw.class_names


IDENTITY_SOURCES: dict[str, Callable[..., tuple[ImageSet, tuple[str, ...]]]] = {
    "fmnist_identities": fmnist_identities,
    "identity_folder": identity_folder,
}


@dataclass(frozen=True)
class IdentitySplit:
    """Image indices of each split, and the identity label of every image after the split:
    training identities ``0..num_train-1`` (what the losses classify), then the validation
    and test identities; -1 for images left out. ``names`` are in label order."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]
    num_train: int


def identity_count(value: int | float | None, total: int, key: str) -> int:
    """``data.<key>`` as a number of identities: a count, or a fraction of ``total``
    (at least ``MIN_IDENTITIES_PER_SPLIT``); 0 for null."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(
            f"data.{key}={value!r} must be a number of identities (2 or more) or a fraction "
            "of them in (0, 1)"
        )
    if isinstance(value, float) and value < 1:
        return max(MIN_IDENTITIES_PER_SPLIT, round(value * total))
    return int(value)


def seeded_order(items: np.ndarray, *seeds: int) -> np.ndarray:
    """``items`` in an order drawn from ``seeds`` alone (independent of other draws)."""
    return np.random.default_rng(list(seeds)).permutation(items)


def split_identities(
    labels: np.ndarray,
    names: tuple[str, ...],
    *,
    seed: int,
    min_images: int,
    images_per_identity: int | None,
    val_identities: int | float | None,
    test_identities: int | float,
    where: str,
) -> IdentitySplit:
    """Hold whole identities out for test (seed ``TEST_SPLIT_SEED``) and validation (the run
    seed); with ``val_identities`` null, validation takes half of each test identity's
    images instead (disjoint from the test images). Identities with fewer than
    ``min_images`` images are left out, and each keeps at most ``images_per_identity``."""
    if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 2:
        raise UserError(
            f"data.min_images_per_identity={min_images!r} must be 2 or more: a positive pair "
            "needs two images of one identity"
        )
    if images_per_identity is not None and not (
        isinstance(images_per_identity, int) and images_per_identity >= min_images
    ):
        raise UserError(
            f"data.images_per_identity={images_per_identity!r} must be at least "
            f"data.min_images_per_identity={min_images} (or null: all)"
        )
    counts = np.bincount(labels, minlength=len(names))
    kept = np.flatnonzero(counts >= min_images)
    dropped = len(names) - len(kept)
    if len(kept) == 0:
        raise UserError(
            f"none of the {len(names)} identities in {where} has "
            f"data.min_images_per_identity={min_images} images or more: add images of each "
            "person (verification needs two of one identity)"
        )
    if dropped:
        print(
            f"Left out {dropped} of {len(names)} identities with fewer than {min_images} "
            f"images (data.min_images_per_identity); {len(kept)} remain.",
            flush=True,
        )
    n_test = identity_count(test_identities, len(kept), "test_identities")
    n_val = identity_count(val_identities, len(kept), "val_identities")
    check_enough_identities(len(kept), n_val, n_test, min_images, where)
    test = seeded_order(kept, TEST_SPLIT_SEED, TEST)[:n_test]
    rest = np.setdiff1d(kept, test)
    val = seeded_order(rest, seed, VAL)[:n_val]
    train = np.setdiff1d(rest, val)
    images = {  # a seeded sample of each identity's images, in a seeded order
        int(i): seeded_order(np.flatnonzero(labels == i), TEST_SPLIT_SEED, TRAIN, int(i))[
            :images_per_identity
        ]
        for i in kept
    }
    order = [*np.sort(train), *np.sort(val), *np.sort(test)]
    relabel = np.full(len(names), -1, dtype=np.int64)
    relabel[order] = np.arange(len(order))

    def of(identities: np.ndarray) -> np.ndarray:
        chosen = [images[int(i)] for i in identities]
        return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)

    test_images, val_images = of(test), of(val)
    if val_identities is None:  # validation: half of each test identity's images
        halves = [np.array_split(images[int(i)], [len(images[int(i)]) // 2]) for i in test]
        val_images = np.sort(np.concatenate([first for first, _ in halves]))
        test_images = np.sort(np.concatenate([second for _, second in halves]))
    return IdentitySplit(
        train=of(train),
        val=val_images,
        test=test_images,
        labels=relabel[labels],
        names=tuple(names[i] for i in order),
        num_train=len(train),
    )


def check_enough_identities(
    kept: int, n_val: int, n_test: int, min_images: int, where: str
) -> None:
    """Each split needs ``MIN_IDENTITIES_PER_SPLIT`` identities; one line saying what to do."""
    least = MIN_IDENTITIES_PER_SPLIT
    if n_test < least or 0 < n_val < least:
        key, count = ("test_identities", n_test) if n_test < least else ("val_identities", n_val)
        raise UserError(
            f"data.{key}={count} is too few: verification needs {least} identities or more "
            "in a split"
        )
    needed = n_val + n_test + least
    if kept < needed:
        splits = f"{least} to train, {n_test} to test" + (f", {n_val} to validate" if n_val else "")
        raise UserError(
            f"{where} has {kept} identities with {min_images} images or more, the split needs "
            f"{needed} ({splits}): add identities or lower data.test_identities / "
            "data.val_identities"
        )
