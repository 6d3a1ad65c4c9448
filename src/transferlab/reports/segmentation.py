"""The segmentation report's figure: test images with their true and predicted masks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def palette(num_classes: int) -> np.ndarray:
    """A colour per class (RGB, 0-1); class 0 is the background."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"](np.linspace(0, 1, 20))[:, :3]
    return np.array([colours[i % 20] for i in range(num_classes)])


def colour_mask(mask: np.ndarray, colours: np.ndarray, ignore: int) -> np.ndarray:
    """A mask as an RGB picture: background dark, each class its colour, ignored pixels white."""
    out = np.full((*mask.shape, 3), 0.12)
    labelled = (mask > 0) & (mask != ignore)
    out[labelled] = colours[np.clip(mask, 0, len(colours) - 1)[labelled]]
    out[mask == ignore] = 1.0
    return out


def overlay_grid(
    images: torch.Tensor,
    masks: torch.Tensor,
    predicted: torch.Tensor,
    class_names: Sequence[str],
    ignore_index: int,
    title: str,
):
    """A figure: one row per test image; the image, its true mask, the predicted mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = palette(len(class_names))
    rows = len(images)
    fig, axes = plt.subplots(rows, 3, figsize=(6.6, 2.2 * rows + 0.9), dpi=100, squeeze=False)
    for row in range(rows):
        panels = (
            images[row].permute(1, 2, 0).clamp(0, 1).numpy(),
            colour_mask(masks[row].numpy(), colours, ignore_index),
            colour_mask(predicted[row].numpy(), colours, ignore_index),
        )
        for col, (panel, name) in enumerate(
            zip(panels, ("image", "true", "predicted"), strict=True)
        ):
            ax = axes[row][col]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
    handles = [Patch(color=colours[i], label=name) for i, name in enumerate(class_names) if i]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    return fig
