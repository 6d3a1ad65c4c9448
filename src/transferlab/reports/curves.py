"""Learning curves of a run, read back from its MLflow metric histories.

Epoch-level metrics are logged with the epoch as their step (``tracking.run.RunLogger``), so
a point's step is its epoch; histories whose steps repeat fall back to the order of the
points. The same reading serves every task: only the names of the metrics differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

TRAIN_LOSS = "train/loss_epoch"
LEARNING_CURVES = "curves/learning_curves.png"
VAL_LOSS = "val/loss"

Curve = tuple[list[int], list[float]]


def epoch_curve(history: Sequence[Any]) -> Curve:
    """(epochs, values) of one epoch-level metric's history."""
    points = sorted(history, key=lambda m: (m.step, m.timestamp))
    values = [float(m.value) for m in points]
    steps = [int(m.step) for m in points]
    if len(set(steps)) != len(steps):
        return list(range(len(points))), values
    return steps, values


def run_curves(client: Any, run_id: str, names: Sequence[str]) -> dict[str, Curve]:
    """The per-epoch curve of each metric in ``names`` that the run has (others left out)."""
    logged = client.get_run(run_id).data.metrics
    return {
        name: epoch_curve(client.get_metric_history(run_id, name))
        for name in dict.fromkeys(names)
        if name in logged
    }


def train_counterpart(monitor: str) -> str:
    """``val/acc`` -> ``train/acc``: the same metric over the training split."""
    return "train/" + monitor.removeprefix("val/")


def best_epoch(curve: Curve, mode: str) -> int | None:
    """The epoch of the best finite value (``mode``: min or max), None when there is none."""
    finite = [(v, e) for e, v in zip(*curve, strict=True) if math.isfinite(v)]
    if not finite:
        return None
    pick = max if mode == "max" else min
    return pick(finite, key=lambda pair: pair[0])[1]


def learning_curves_figure(curves: Mapping[str, Curve], monitor: str, mode: str, title: str = ""):
    """Loss and the monitored metric (train and val) per epoch, the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("loss", (TRAIN_LOSS, VAL_LOSS))]
    if monitor != VAL_LOSS:
        panels.append((monitor.removeprefix("val/"), (train_counterpart(monitor), monitor)))
    best = best_epoch(curves[monitor], mode) if monitor in curves else None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), dpi=100)
    for ax, (label, names) in zip(list(getattr(axes, "flat", [axes])), panels, strict=True):
        for name in names:
            if name in curves:
                epochs, values = curves[name]
                ax.plot(epochs, values, marker="o", markersize=3, label=name)
        if best is not None:
            ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best}")
        if monitor in names and best is not None:
            epochs, values = curves[monitor]
            ax.plot(best, values[epochs.index(best)], marker="*", markersize=12, color="black")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def log_learning_curves(run: Any, monitor: str, mode: str, title: str = "") -> None:
    """``curves/learning_curves.png`` from the run's own histories; metrics missing are skipped."""
    import matplotlib.pyplot as plt

    names = [TRAIN_LOSS, VAL_LOSS, train_counterpart(monitor), monitor]
    curves = run.send("the learning curves", lambda: run_curves(run.client, run.run_id, names))
    if curves is None:  # the tracking server went away
        return
    figure = learning_curves_figure(curves, monitor, mode, title)
    run.log_figure(figure, LEARNING_CURVES)
    plt.close(figure)
