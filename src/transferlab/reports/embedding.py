"""The embedding report's figures: the verification ROC curve, a 2-D map of the test
embeddings, and test images with their nearest neighbours."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

# Points of the 2-D map: t-SNE costs grow with the square of the points.
MAX_PROJECTED = 2000
PROJECTION_SEED = 0
QUERIES = 6  # test images shown with their neighbours, each identity in turn
NEIGHBOURS = 5
SAME_COLOUR, OTHER_COLOUR = "limegreen", "red"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_figure(scores: torch.Tensor, same: torch.Tensor, chosen: Mapping[str, float], title: str):
    """TAR against FAR (log scale) over the pairs, with the operating point of the threshold
    ``chosen["threshold"]`` (chosen on validation for ``chosen["far"]``) marked."""
    from torchmetrics.functional.classification import binary_roc

    from transferlab.tasks.embedding_metrics import as_probability, rates_at

    plt = _pyplot()
    far, tar, _ = binary_roc(as_probability(scores), same.long())
    negatives = int((~same).sum())
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    floor = 1 / max(negatives, 1)  # the smallest FAR the pairs can measure
    visible = far >= floor
    ax.plot(far[visible].numpy(), tar[visible].numpy(), color="tab:blue", label="test pairs")
    point_far, point_tar = rates_at(scores, same, chosen["threshold"])
    ax.plot(
        [max(point_far, floor)], [point_tar], "o", color="tab:red",
        label=f"threshold {chosen['threshold']:.3f} (FAR {chosen['far']:g} on "
        f"{chosen['chosen_on']}): FAR {point_far:.2g}, TAR {point_tar:.3f}",
    )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"false accept rate ({negatives} negative pairs)")
    ax.set_ylabel(f"true accept rate ({int(same.sum())} positive pairs)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def projection_figure(
    embeddings: torch.Tensor, labels: torch.Tensor, names: Sequence[str], title: str
):
    """t-SNE of (a seeded sample of) the embeddings, coloured by identity; a legend names
    up to 20 identities."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    index = np.arange(len(labels))
    if len(index) > MAX_PROJECTED:
        index = np.sort(np.random.default_rng(PROJECTION_SEED).permutation(index)[:MAX_PROJECTED])
    points = embeddings[index].double().numpy()
    perplexity = float(min(30, max(1, (len(points) - 1) // 3)))  # below the point count
    projected = TSNE(
        2, perplexity=perplexity, init="pca", random_state=PROJECTION_SEED, metric="cosine"
    ).fit_transform(points)
    chosen = labels[index].numpy()
    identities = np.unique(chosen)
    palette = plt.get_cmap("tab10" if len(identities) <= 10 else "tab20")
    colours = palette(np.arange(palette.N))
    fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
    for k, identity in enumerate(identities):
        where = chosen == identity
        ax.scatter(
            *projected[where].T, s=8, color=colours[k % len(colours)],
            label=names[identity] if len(identities) <= 20 else None,
        )  # fmt: skip
    if len(identities) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(
        f"{title}\n(t-SNE of {len(points)} images, {len(identities)} identities)", fontsize=10
    )
    fig.tight_layout()
    return fig


def spread_queries(labels: torch.Tensor, count: int) -> list[int]:
    """Up to ``count`` test images, the first of each identity in turn, then the second..."""
    from transferlab.tasks.classification import spread_over_classes

    return spread_over_classes(torch.arange(len(labels)), labels, count)


def neighbours_figure(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    datamodule: Any,
    names: Sequence[str],
    title: str,
):
    """A row per query: the test image, then its ``NEIGHBOURS`` most similar other test
    images, framed green for the same identity and red for another, with their cosine
    similarity."""
    from transferlab.reports.confusion import for_display

    plt = _pyplot()
    queries = spread_queries(labels, QUERIES)
    normalised = torch.nn.functional.normalize(embeddings.double(), dim=1)
    similarity = normalised[queries] @ normalised.T
    similarity[torch.arange(len(queries)), queries] = -float("inf")  # not itself
    top = similarity.topk(min(NEIGHBOURS, len(labels) - 1), dim=1)
    columns = 1 + top.indices.shape[1]
    fig, axes = plt.subplots(
        len(queries), columns, figsize=(1.6 * columns, 1.7 * len(queries) + 0.6), squeeze=False
    )
    for row, query in enumerate(queries):
        shown = [
            (query, None),
            *zip(top.indices[row].tolist(), top.values[row].tolist(), strict=True),
        ]
        for ax, (index, score) in zip(axes[row], shown, strict=True):
            ax.imshow(for_display(datamodule.test_set[index]["image"].numpy()))
            ax.set_xticks([])
            ax.set_yticks([])
            name = names[int(labels[index])]
            if score is None:
                ax.set_title(f"query\n{name}", fontsize=7)
                continue
            colour = SAME_COLOUR if labels[index] == labels[query] else OTHER_COLOUR
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            ax.set_title(f"{name}\n{score:.3f}", fontsize=7, color=colour)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
