"""Seeded, stratified selection of indices: held-out carving and few-shot sampling.

Each class is shuffled by its own generator, seeded from (seed, purpose, class), so the order
of a class never depends on the other classes, and a smaller few-shot subset is a prefix of a
larger one for the same seed.
"""

from __future__ import annotations

import logging

import numpy as np

from transferlab.errors import UserError

log = logging.getLogger(__name__)

# Purposes keep the random streams of the different selections apart.
TEST, VAL, TRAIN = 1, 2, 3


def _shuffled_classes(labels: np.ndarray, indices: np.ndarray, seed: int, purpose: int):
    for label in np.unique(labels[indices]):
        members = indices[labels[indices] == label]
        rng = np.random.default_rng([seed, purpose, int(label)])
        yield int(label), rng.permutation(members)


def carve_stratified(
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    seed: int,
    purpose: int,
    fraction: float | None = None,
    per_class: int | None = None,
    class_names: tuple[str, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (carved, rest): per class ``per_class`` items or ``fraction`` of them.

    A class always keeps at least one item in ``rest``; a nonzero ``fraction`` carves at least
    one item from every class that has two or more.
    """
    carved, short = [], []
    for label, members in _shuffled_classes(labels, indices, seed, purpose):
        if per_class is not None:
            want = per_class
        else:
            want = round((fraction or 0.0) * len(members))
            want = max(want, 1) if fraction else 0
        take = min(want, len(members) - 1)
        if per_class is not None and take < want:
            short.append(_name(label, class_names))
        carved.append(members[:take])
    if short:
        log.warning(
            "val_per_class=%d exceeds what class(es) %s have: kept one image of each for training",
            per_class,
            ", ".join(short),
        )
    taken = np.sort(np.concatenate(carved)) if carved else np.empty(0, dtype=np.int64)
    return taken, np.setdiff1d(indices, taken)


def sample_per_class(
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    seed: int,
    per_class: int,
    class_names: tuple[str, ...] | None = None,
) -> np.ndarray:
    """The first ``per_class`` items of each class's seeded shuffle (all of a smaller class)."""
    chosen, short = [], []
    for label, members in _shuffled_classes(labels, indices, seed, TRAIN):
        if len(members) < per_class:
            short.append(f"{_name(label, class_names)} ({len(members)})")
        chosen.append(members[:per_class])
    if short:
        log.warning(
            "samples_per_class=%d exceeds what class(es) have, using all of them: %s",
            per_class,
            ", ".join(short),
        )
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def _name(label: int, class_names: tuple[str, ...] | None) -> str:
    return class_names[label] if class_names and label < len(class_names) else str(label)


def check_fractions(val_fraction: float, test_fraction: float) -> tuple[float, float]:
    """``data.val_fraction`` and ``data.test_fraction`` as floats, each in (0, 1) and
    together leaving training images."""
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < float(value) < 1:
            raise UserError(f"data.{key}={value} must be between 0 and 1 (exclusive)")
    if float(val_fraction) + float(test_fraction) >= 1:
        raise UserError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} leave no "
            "training images: make their sum less than 1"
        )
    return float(val_fraction), float(test_fraction)
