"""Tables and charts over the runs of an MLflow experiment (strategy comparisons, sweeps)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any


def run_label(params: dict[str, str]) -> str:
    """The strategy of a run, with the random-init control called by its name."""
    if params.get("model.pretrained") == "False":
        return "from_scratch"
    return params.get("finetune.strategy", "?")


def experiment_rows(
    experiment_name: str, tracking_uri: str, group_by: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One row per finished run: label, group-by params, test metrics and timings.

    Where several runs share a label and group-by values, only the newest is kept.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        from transferlab.errors import UserError

        raise UserError(f"no MLflow experiment named {experiment_name!r} in {tracking_uri}")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    rows, seen = [], set()
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        row = {"strategy": run_label(params), **{key: params.get(key) for key in group_by}}
        key = tuple(row.values())
        if key in seen:
            continue
        seen.add(key)
        row.update(
            {
                "test/acc": metrics.get("test/acc", math.nan),
                "test/f1": metrics.get("test/f1", math.nan),
                "val/acc (best)": max(
                    (m.value for m in client.get_metric_history(run.info.run_id, "val/acc")),
                    default=math.nan,
                ),
                "fit time (s)": metrics.get("time/fit_s", math.nan),
                "run": run.info.run_id[:8],
            }
        )
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no finished runs)"
    header = list(rows[0])

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_chart(rows: Sequence[dict[str, Any]], x: str, title: str):
    """Test accuracy against ``x`` (log scale), one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        series[row["strategy"]].append((float(row[x]), row["test/acc"]))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
