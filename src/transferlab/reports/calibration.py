"""Calibration of a classifier: expected calibration error, temperature scaling, and the
reliability diagram (accuracy against confidence, per confidence bin)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.utilities import dim_zero_cat

N_BINS = 15


class SplitLogits(Metric):
    """Every logit and label of a split, kept (and gathered across processes) for the report."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("logits", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        self.logits.append(logits.detach().float())
        self.target.append(target.detach())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return dim_zero_cat(self.logits), dim_zero_cat(self.target)


def expected_calibration_error(
    probs: torch.Tensor, target: torch.Tensor, n_bins: int = N_BINS
) -> float:
    """ECE (l1, ``n_bins`` equal-width confidence bins) of class probabilities ``probs``."""
    metric = MulticlassCalibrationError(probs.shape[1], n_bins=n_bins, norm="l1")
    return float(metric(probs, target))


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (LBFGS on log T)."""
    logits, target = logits.detach().double().cpu(), target.detach().long().cpu()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def reliability_bins(
    probs: torch.Tensor, target: torch.Tensor, n_bins: int = N_BINS
) -> list[dict[str, float]]:
    """Per confidence bin (binned as torchmetrics does): its bounds, count, correct, mean
    confidence and accuracy."""
    confidence, predicted = probs.max(dim=1)
    correct = predicted == target
    bounds = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype)
    index = (torch.bucketize(confidence, bounds, right=True) - 1).clamp(0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        inside = index == b
        count = int(inside.sum())
        rows.append(
            {
                "lower": float(bounds[b]),
                "upper": float(bounds[b + 1]),
                "count": count,
                "correct": int(correct[inside].sum()),
                "confidence": float(confidence[inside].mean()) if count else 0.0,
                "accuracy": float(correct[inside].float().mean()) if count else 0.0,
            }
        )
    return rows


def reliability_csv(diagrams: Mapping[str, list[dict[str, float]]]) -> str:
    """One row per (scaling, bin): the bins behind each reliability diagram."""
    lines = ["scaling,bin_lower,bin_upper,count,correct,mean_confidence"]
    for scaling, rows in diagrams.items():
        lines += [
            f"{scaling},{r['lower']:.4f},{r['upper']:.4f},{r['count']},{r['correct']},"
            f"{r['confidence']:.6f}"
            for r in rows
        ]
    return "\n".join(lines) + "\n"


def reliability_figure(
    diagrams: Mapping[str, tuple[list[dict[str, float]], float]], title: str = ""
):
    """One column per diagram (name -> (bins, ECE)): accuracy per confidence bin against
    the diagonal of perfect calibration, and the number of test images in each bin below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = len(diagrams)
    fig, axes = plt.subplots(
        2, columns, figsize=(4.5 * columns, 5.5), dpi=100, squeeze=False,
        gridspec_kw={"height_ratios": [3, 1]}, sharex=True,
    )  # fmt: skip
    for column, (name, (rows, ece)) in enumerate(diagrams.items()):
        top, bottom = axes[0, column], axes[1, column]
        centres = [(r["lower"] + r["upper"]) / 2 for r in rows]
        width = rows[0]["upper"] - rows[0]["lower"]
        filled = [r["count"] > 0 for r in rows]
        top.bar(
            [c for c, f in zip(centres, filled, strict=True) if f],
            [r["accuracy"] for r, f in zip(rows, filled, strict=True) if f],
            width=width, edgecolor="black", color="tab:blue", alpha=0.8, label="accuracy",
        )  # fmt: skip
        top.plot(
            [c for c, f in zip(centres, filled, strict=True) if f],
            [r["confidence"] for r, f in zip(rows, filled, strict=True) if f],
            "_", color="tab:red", markersize=14, markeredgewidth=2, label="mean confidence",
        )  # fmt: skip
        top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.set_title(f"{name}: ECE {ece:.4f}")
        top.legend(fontsize="x-small", loc="upper left", framealpha=0.6)
        bottom.bar(
            centres, [r["count"] for r in rows], width=width, color="grey", edgecolor="black"
        )
        bottom.set_xlabel("confidence")
        bottom.set_ylabel("images")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
