"""The detection report's figures: test images with true and predicted boxes, and the
precision-recall curve of each class."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

TRUE_COLOUR = "limegreen"
PREDICTED_COLOUR = "red"


def boxes_grid(
    images: torch.Tensor,
    targets: Sequence[Mapping[str, torch.Tensor]],
    predictions: Sequence[Mapping[str, torch.Tensor]],
    class_names: Sequence[str],
    score_threshold: float,
    title: str,
    columns: int = 4,
):
    """A figure of ``images`` (``[B, 3, H, W]`` in 0-1) with their true boxes (green) and the
    predicted boxes scoring at least ``score_threshold`` (red, with class and score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    count = len(images)
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.4 * columns, 2.4 * rows + 0.8), dpi=100, squeeze=False
    )
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(count):
        ax = axes.flat[i]
        ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
        for box in targets[i]["boxes"].tolist():
            ax.add_patch(_rectangle(Rectangle, box, TRUE_COLOUR))
        found = predictions[i]
        keep = found["scores"] >= score_threshold
        for box, label, score in zip(
            found["boxes"][keep].tolist(),
            found["labels"][keep].tolist(),
            found["scores"][keep].tolist(),
            strict=True,
        ):
            ax.add_patch(_rectangle(Rectangle, box, PREDICTED_COLOUR))
            ax.text(
                box[0],
                box[1],
                f"{_name(class_names, label)} {score:.2f}",
                color="white",
                fontsize=6,
                va="bottom",
                bbox={"facecolor": PREDICTED_COLOUR, "alpha": 0.7, "pad": 1, "linewidth": 0},
            )
    handles = [
        Patch(edgecolor=TRUE_COLOUR, facecolor="none", label="true"),
        Patch(edgecolor=PREDICTED_COLOUR, facecolor="none", label="predicted"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"{title}\npredicted boxes with score >= {score_threshold:g}", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return fig


def pr_curves_figure(
    curves: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    class_names: Sequence[str],
    title: str,
    iou: float = 0.5,
):
    """Precision against recall for each class (``DetectionScores.pr_curves``), its AP at
    this IoU (the mean precision over the 101 recall points) in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    for label, (recall, precision) in sorted(curves.items()):
        ap = float(precision.mean())
        ax.plot(
            recall.numpy(),
            precision.numpy(),
            label=f"{_name(class_names, label)} (AP@{iou:g} {ap:.3f})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"{title}\nprecision-recall at IoU {iou:g}", fontsize=9)
    fig.tight_layout()
    return fig


def _rectangle(factory, box: list[float], colour: str):
    x0, y0, x1, y1 = box
    return factory((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.2)


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else str(label)
