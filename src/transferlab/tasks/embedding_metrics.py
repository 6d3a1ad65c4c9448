"""Open-set metrics of embeddings over a whole split: verification of pairs and retrieval.

Verification (face recognition's protocol): every pair of the split's images (or a seeded
sample of ``max_pairs``) is scored by the cosine similarity of its embeddings; a pair is
positive when both images show one identity. From the scores: ROC AUC, the equal error
rate, the true accept rate at false accept rates 1e-3 and 1e-2 (torchmetrics), and LFW's
10-fold accuracy (each fold's threshold chosen on the other nine). Retrieval: each image
queries the others; precision@1 and MAP@R (pytorch-metric-learning's AccuracyCalculator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

FARS = (1e-3, 1e-2)
FOLDS = 10
MAX_PAIRS = 1_000_000
PAIR_SEED = 0


def far_key(far: float) -> str:
    """``1e-2`` -> ``far_1e-2`` (MLflow metric names take no ``@``)."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"far_{mantissa}e{int(exponent)}"


def pair_indices(labels: Tensor, max_pairs: int, seed: int = PAIR_SEED) -> tuple[Tensor, Tensor]:
    """Index pairs (i < j): all of them, or when there are more than ``max_pairs``, every
    positive pair (a seeded sample of half ``max_pairs`` if more) and seeded random
    negative pairs up to ``max_pairs``."""
    n = len(labels)
    if n * (n - 1) // 2 <= max_pairs:
        first, second = torch.triu_indices(n, n, offset=1)
        return first, second
    generator = torch.Generator().manual_seed(seed)
    positives = [
        torch.combinations(torch.nonzero(labels == label).flatten(), 2)
        for label in torch.unique(labels)
        if int((labels == label).sum()) > 1
    ]
    pos = torch.cat(positives) if positives else torch.empty(0, 2, dtype=torch.long)
    if len(pos) > max_pairs // 2:
        pos = pos[torch.randperm(len(pos), generator=generator)[: max_pairs // 2]]
    draws = torch.randint(0, n, (2, 2 * (max_pairs - len(pos))), generator=generator)
    negative = labels[draws[0]] != labels[draws[1]]
    neg = draws[:, negative][:, : max_pairs - len(pos)].T
    pairs = torch.cat([pos, torch.sort(neg, dim=1).values])
    return pairs[:, 0], pairs[:, 1]


def pair_scores(
    embeddings: Tensor, labels: Tensor, max_pairs: int = MAX_PAIRS
) -> tuple[Tensor, Tensor]:
    """(cosine similarity, same identity) of the split's pairs (``pair_indices``)."""
    first, second = pair_indices(labels, max_pairs)
    normalised = torch.nn.functional.normalize(embeddings.double(), dim=1)
    scores = (normalised[first] * normalised[second]).sum(1)
    return scores, labels[first] == labels[second]


def as_probability(scores: Tensor) -> Tensor:
    """Cosine similarities mapped into [0, 1], which torchmetrics takes as probabilities
    (it would apply a sigmoid to scores outside that range); the order is unchanged."""
    return ((scores + 1) / 2).clamp(0, 1)


def tar_at_far(scores: Tensor, same: Tensor, far: float) -> tuple[float, float]:
    """The true accept rate at a false accept rate of at most ``far``, and the similarity
    threshold that gives it (pairs scoring at least it are accepted)."""
    from torchmetrics.functional.classification import binary_sensitivity_at_specificity

    tar, threshold = binary_sensitivity_at_specificity(
        as_probability(scores), same.long(), min_specificity=1 - far
    )
    return float(tar), float(2 * threshold - 1)


def rates_at(scores: Tensor, same: Tensor, threshold: float) -> tuple[float, float]:
    """(false accept rate, true accept rate) when pairs scoring at least ``threshold`` are
    accepted."""
    accepted = scores >= threshold
    return float(accepted[~same].double().mean()), float(accepted[same].double().mean())


def best_threshold(scores: Tensor, same: Tensor) -> float:
    """The threshold that classifies the most pairs right when pairs scoring at least it are
    called the same identity: halfway between two neighbouring scores (or beyond them all),
    so that a pair scoring close to the boundary falls on the side of its neighbours."""
    unique = torch.unique(scores)
    candidates = torch.cat([unique[:1] - 1, (unique[:-1] + unique[1:]) / 2, unique[-1:] + 1])
    positives = torch.sort(scores[same]).values
    negatives = torch.sort(scores[~same]).values
    accepted = len(positives) - torch.searchsorted(positives, candidates)
    rejected = torch.searchsorted(negatives, candidates)
    return float(candidates[torch.argmax(accepted + rejected)])


def kfold_accuracy(
    scores: Tensor, same: Tensor, folds: int = FOLDS, seed: int = PAIR_SEED
) -> float:
    """LFW's verification accuracy: the pairs in ``folds`` seeded folds; each fold is
    classified at the best threshold of the other folds, and the accuracies averaged."""
    order = torch.randperm(len(scores), generator=torch.Generator().manual_seed(seed))
    accuracies = []
    for held in torch.tensor_split(order, folds):
        train = torch.ones(len(scores), dtype=torch.bool)
        train[held] = False
        threshold = best_threshold(scores[train], same[train])
        accuracies.append(float(((scores[held] >= threshold) == same[held]).double().mean()))
    return float(np.mean(accuracies))


def verification(scores: Tensor, same: Tensor, fars: Sequence[float] = FARS) -> dict[str, float]:
    """ROC AUC, EER, TAR (and its threshold) at each FAR, and 10-fold accuracy; NaN when
    the pairs are all positive or all negative."""
    from torchmetrics.functional.classification import binary_auroc, binary_eer

    keys = ["roc_auc", "eer", "verify_acc"]
    keys += [f"{kind}_at_{far_key(far)}" for far in fars for kind in ("tar", "threshold")]
    if bool(same.all()) or not bool(same.any()):
        return dict.fromkeys(keys, math.nan)
    probabilities, target = as_probability(scores), same.long()
    values = {
        "roc_auc": float(binary_auroc(probabilities, target)),
        "eer": float(binary_eer(probabilities, target)),
        "verify_acc": kfold_accuracy(scores, same),
    }
    for far in fars:
        values[f"tar_at_{far_key(far)}"], values[f"threshold_at_{far_key(far)}"] = tar_at_far(
            scores, same, far
        )
    return values


def retrieval(embeddings: Tensor, labels: Tensor) -> dict[str, float]:
    """Precision@1 and MAP@R of each image querying all the others (cosine similarity)."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity()),
    )
    found = calculator.get_accuracy(embeddings.float(), labels)
    return {
        "precision_at_1": float(found["precision_at_1"]),
        "map_at_r": float(found["mean_average_precision_at_r"]),
    }


class EmbeddingScores(Metric):
    """Verification and retrieval metrics of a split, from all its embeddings and labels.

    The states are lists concatenated across processes (``dist_reduce_fx="cat"``), so under
    DDP every process computes on the whole split. ``compute`` also keeps the thresholds of
    each FAR; the report reads :meth:`split` for the embeddings.
    """

    full_state_update = False

    def __init__(self, fars: Sequence[float] = FARS, max_pairs: int = MAX_PAIRS) -> None:
        super().__init__()
        self.fars, self.max_pairs = tuple(fars), int(max_pairs)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        self.embeddings.append(embeddings.detach().float())
        self.labels.append(torch.as_tensor(labels, device=embeddings.device))

    def split(self) -> tuple[Tensor, Tensor]:
        """Every embedding and label of the split (all processes', under DDP), on the CPU,
        in the order the loader gave them (the split's order on one process)."""
        with self.sync_context():  # nothing to sync on one process
            return self._accumulated()

    def _accumulated(self) -> tuple[Tensor, Tensor]:
        return dim_zero_cat(self.embeddings).cpu(), dim_zero_cat(self.labels).cpu()

    def compute(self) -> dict[str, Tensor]:  # torchmetrics syncs the states before it
        embeddings, labels = self._accumulated()
        scores, same = pair_scores(embeddings, labels, self.max_pairs)
        values = {**verification(scores, same, self.fars), **retrieval(embeddings, labels)}
        return {key: torch.tensor(value) for key, value in values.items()}
