"""Confusion matrix figure and per-class precision / recall / F1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def per_class_metrics(confusion: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """One row per class: support, precision, recall, F1 (rows of ``confusion`` = truth)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_pos = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return [
        {
            "class": name,
            "support": int(support[i]),
            "precision": round(float(precision[i]), 4),
            "recall": round(float(recall[i]), 4),
            "f1": round(float(f1[i]), 4),
        }
        for i, name in enumerate(class_names)
    ]


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str], title: str = ""):
    """A row-normalised confusion matrix heat map with counts, as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    n = len(class_names)
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros(confusion.shape), where=rows > 0)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=100)
    ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels=class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    int(confusion[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if normalised[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    return fig


def top_confusions(confusion: np.ndarray, k: int = 5) -> list[tuple[int, int, int]]:
    """The ``k`` most frequent mistakes as (true, predicted, count), largest first."""
    confusion = np.asarray(confusion)
    mistakes = [
        (int(t), int(p), int(confusion[t, p]))
        for t, p in zip(*np.nonzero(confusion), strict=True)
        if t != p
    ]
    return sorted(mistakes, key=lambda m: (-m[2], m[0], m[1]))[:k]


def confused_pairs_figure(
    pairs: Sequence[tuple[str, str, int, Sequence[np.ndarray]]], title: str = ""
):
    """One row per confused pair (true, predicted, count, example images as HxWx3 in 0-1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max([len(images) for *_, images in pairs] + [1])
    fig, axes = plt.subplots(
        len(pairs), columns, figsize=(1.8 * columns + 2.2, 1.9 * len(pairs) + 0.6),
        dpi=100, squeeze=False,
    )  # fmt: skip
    for row, (true, predicted, count, images) in zip(axes, pairs, strict=True):
        for i, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if i < len(images):
                ax.imshow(images[i])
            else:
                ax.axis("off")
        row[0].set_ylabel(f"{true}\n→ {predicted}\n({count})", rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def for_display(image: np.ndarray) -> np.ndarray:
    """A normalised CxHxW image as HxWx3 in 0-1 (each image stretched to its own range)."""
    image = np.asarray(image, dtype=np.float64)
    image = image.transpose(1, 2, 0) if image.ndim == 3 else image[..., None]
    low, high = image.min(), image.max()
    image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
