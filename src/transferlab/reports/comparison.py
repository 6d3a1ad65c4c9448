"""A sweep's comparison: one row per job (child run), the best job, a chart, CSV and Markdown.

The same table is logged to the sweep's parent run when the sweep ends and printed by
``transferlab compare``.
"""

from __future__ import annotations

import csv
import math
import shlex
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.reports.titles import fitted_suptitle

# Runs recorded before tasks declared their columns (tag ``task.compare_metrics``) were
# classification runs.
CLASSIFICATION_METRICS = ("test/acc", "test/f1", "test/top5")


# Runs evaluated under the corruption suite (``shift=corruptions``) show their clean and
# shifted values side by side: these summaries follow the test metrics.
SHIFT_SUMMARIES = ("shift/mean/", "shift/relative_drop/")


def test_metrics_of(runs: Sequence[Any]) -> list[str]:
    """The test metric columns the runs' tasks declare, in order, without repeats, then the
    corruption suite's summaries of the runs that have them."""
    columns: list[str] = []
    for run in runs:
        declared = run.data.tags.get("task.compare_metrics")
        names = declared.split(",") if declared else CLASSIFICATION_METRICS
        columns += [name for name in names if name and name not in columns]
    columns = columns or list(CLASSIFICATION_METRICS)
    for prefix in SHIFT_SUMMARIES:
        found = {name for run in runs for name in run.data.metrics if name.startswith(prefix)}
        columns += sorted(found)
    return columns


@dataclass
class Comparison:
    """Rows of a sweep (or an experiment), with what is needed to rank and chart them."""

    title: str
    monitor: str
    mode: str
    rows: list[dict[str, Any]]
    optuna: bool = False
    test_metrics: Sequence[str] = CLASSIFICATION_METRICS
    # A param to chart the first test metric against (one line per configuration).
    x: str | None = None
    failed: int = field(init=False)

    def __post_init__(self) -> None:
        self.failed = sum(row["status"] != "FINISHED" for row in self.rows)

    @property
    def metric_column(self) -> str:
        return f"best {self.monitor}"

    def best(self) -> dict[str, Any] | None:
        """The finished row with the best monitored value (None if there is none)."""
        scored = [
            row
            for row in self.rows
            if row["status"] == "FINISHED" and math.isfinite(row[self.metric_column])
        ]
        if not scored:
            return None
        pick = max if self.mode == "max" else min
        return pick(scored, key=lambda row: row[self.metric_column])


def split_overrides(text: str | None) -> dict[str, str]:
    """``"a=1 b=x"`` as ``{"a": "1", "b": "x"}`` (the job's Hydra overrides)."""
    if not text or text == "(none)":
        return {}
    try:
        parts = shlex.split(text)
    except ValueError:
        parts = text.split()
    return dict(part.split("=", 1) for part in parts if "=" in part)


def short_value(value: str) -> str:
    """Floats such as Optuna's samples to 4 significant digits (the run's params keep all)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() or len(value) <= 8 else f"{number:.4g}"


def varying(overrides: Sequence[dict[str, str]]) -> list[str]:
    """The override keys whose values differ between jobs (all keys if only one job)."""
    keys = list(dict.fromkeys(k for o in overrides for k in o))
    if len(overrides) < 2:
        return keys
    return [k for k in keys if len({o.get(k) for o in overrides}) > 1]


def comparison_rows(
    runs: Sequence[Any], monitor: str, x: str | None = None
) -> list[dict[str, Any]]:
    """One row per MLflow run (oldest first): what differs, status, metrics, cost.

    With ``x``, the run's value of param ``x`` gets a column of its own.
    """
    overrides = [split_overrides(run.data.tags.get("overrides")) for run in runs]
    keys = [key for key in varying(overrides) if key != x]
    test_metrics = test_metrics_of(runs)
    rows = []
    for run, job in zip(runs, overrides, strict=True):
        metrics, info = run.data.metrics, run.info
        wall = (info.end_time - info.start_time) / 1000 if info.end_time else math.nan
        row: dict[str, Any] = {
            "job": run.data.tags.get("sweep.job_num", ""),
            "run_id": info.run_id,
            "overrides": " ".join(f"{k}={short_value(job[k])}" for k in keys if k in job)
            or info.run_name,
            **({x: run.data.params.get(x, "")} if x else {}),
            "status": info.status,
            f"best {monitor}": metrics.get(f"best/{monitor}", math.nan),
            **{name: metrics.get(name, math.nan) for name in test_metrics},
            "trainable params": metrics.get("params/trainable", math.nan),
            "wall time (s)": wall,
            "images/s": metrics.get("perf/train_images_per_s", math.nan),
            "error": run.data.tags.get("error", ""),
        }
        rows.append(row)
    return rows


def load_sweep(client: Any, parent_run_id: str, x: str | None = None) -> Comparison:
    """The comparison of the child runs of ``parent_run_id``."""
    parent = client.get_run(parent_run_id)
    tags = parent.data.tags
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=50000,
    )
    monitor = tags.get("sweep.monitor", "val/acc")
    optuna = tags.get("sweep.sweeper") == "optuna"
    if not optuna:  # a grid reads best in job order; a search in the order trials ran
        runs = sorted(runs, key=lambda run: int(run.data.tags.get("sweep.job_num", 0)))
    return Comparison(
        title=parent.info.run_name,
        monitor=monitor,
        mode=tags.get("sweep.mode", "max"),
        rows=comparison_rows(runs, monitor, x),
        optuna=optuna,
        test_metrics=test_metrics_of(runs),
        x=x,
    )


def most_common_param(runs: Sequence[Any], name: str, default: str) -> str:
    values = [run.data.params[name] for run in runs if name in run.data.params]
    return max(set(values), key=values.count) if values else default


def load_experiment(
    client: Any,
    experiment: Any,
    monitor: str | None = None,
    mode: str | None = None,
    x: str | None = None,
) -> Comparison:
    """The comparison of every training run of ``experiment`` (not sweep parents, not
    evaluations).

    ``monitor`` and ``mode`` default to the ones the runs were trained with.
    """
    runs = client.search_runs(
        [experiment.experiment_id],
        order_by=["attributes.start_time ASC"],
        max_results=50000,
    )
    # Sweep parents summarise their children; evaluations (`transferlab eval`) repeat a run.
    runs = [
        run
        for run in runs
        if run.data.tags.get("sweep.parent") != "true" and "evaluates" not in run.data.tags
    ]
    monitor = monitor or most_common_param(runs, "monitor", "val/acc")
    return Comparison(
        experiment.name,
        monitor,
        mode or most_common_param(runs, "mode", "max"),
        comparison_rows(runs, monitor, x),
        test_metrics=test_metrics_of(runs),
        x=x,
    )


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def table_columns(comparison: Comparison) -> list[str]:
    """The columns worth showing: no all-empty metric columns, errors only if a job failed."""
    rows = comparison.rows
    columns = [c for c in rows[0] if c != "error" or comparison.failed] if rows else []
    return [
        c
        for c in columns
        if not all(isinstance(r[c], float) and math.isnan(r[c]) for r in rows)
        or c == comparison.metric_column
    ]


def markdown(comparison: Comparison) -> str:
    """The table as Markdown; the best job is marked with a star and run ids are cut to 8."""
    if not comparison.rows:
        return "(no runs)"
    columns = table_columns(comparison)
    best = comparison.best()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in comparison.rows:
        cells = [format_cell(row[c]) for c in columns]
        if "run_id" in columns:
            cells[columns.index("run_id")] = row["run_id"][:8]
        if "error" in columns:  # the first line, cut; the CSV has the whole text
            cells[columns.index("error")] = short_error(row["error"])
        if row is best:
            cells[columns.index("overrides")] += " *"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ERROR_CHARS = 80  # of an error's first line in the Markdown table


def short_error(text: str) -> str:
    """An error's first line, at most ``ERROR_CHARS`` characters, table-safe."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = line.replace("|", "/")
    return line if len(line) <= ERROR_CHARS else line[: ERROR_CHARS - 1] + "…"


def description(comparison: Comparison, client: Any) -> str:
    """The parent run's MLflow description: the summary, with a link to the best child's
    page (a link relative to the dashboard, so it works on any host)."""
    best = comparison.best()
    text = summary(comparison)
    if best is None:
        return text
    run = client.get_run(best["run_id"])
    page = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return f"{text}\n\nBest run: [{run.info.run_name}]({page})"


def summary(comparison: Comparison) -> str:
    best = comparison.best()
    counts = f"{len(comparison.rows)} jobs, {comparison.failed} failed or unfinished"
    if best is None:
        return f"{comparison.title}: {counts}; no finished job to rank."
    return (
        f"{comparison.title}: {counts}. Best (*): {best['overrides']} with "
        f"{comparison.metric_column} = {best[comparison.metric_column]:.4f}"
        f" (run {best['run_id']})."
    )


def write_csv(comparison: Comparison, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(comparison.rows[0]))
        writer.writeheader()
        writer.writerows(comparison.rows)


def chart(comparison: Comparison):
    """Optuna: the optimisation history. Grid: each metric per configuration, seeds as dots.
    With ``x``: the first test metric against ``x``, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in comparison.rows if r["status"] == "FINISHED"]
    if comparison.x:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        trend_axes(ax, comparison, finished)
    elif comparison.optuna:
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        history_axes(ax, comparison, finished)
    else:
        metrics = [comparison.metric_column] + [
            m
            for m in comparison.test_metrics[:1]
            if any(math.isfinite(r.get(m, math.nan)) for r in finished)
        ]
        groups = grouped(finished)
        height = max(3.0, 0.45 * len(groups) + 1.5)
        fig, axes = plt.subplots(
            1, len(metrics), figsize=(5 * len(metrics) + 2, height), dpi=100, sharey=True
        )
        panels = list(axes) if len(metrics) > 1 else [axes]
        for ax, metric in zip(panels, metrics, strict=True):
            spread_axes(ax, groups, metric)
        panels[0].invert_yaxis()  # first configuration on top (the y axis is shared)
    title = f"{comparison.title} ({len(finished)} of {len(comparison.rows)} jobs finished)"
    fitted_suptitle(fig, title)
    fig.set_layout_engine("constrained")
    return fig


def grouped(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by configuration: the overrides without the seed, so seeds form the spread."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        parts = [p for p in str(row["overrides"]).split() if not p.startswith("seed=")]
        groups[" ".join(parts) or "(all)"].append(row)
    return groups


def spread_axes(ax: Any, groups: dict[str, list[dict[str, Any]]], metric: str) -> None:
    for i, rows in enumerate(groups.values()):
        values = [r[metric] for r in rows if math.isfinite(r[metric])]
        if not values:
            continue
        ax.scatter(values, [i] * len(values), color="tab:blue", alpha=0.6, zorder=3)
        mean = sum(values) / len(values)
        ax.errorbar(
            mean, i, xerr=[[mean - min(values)], [max(values) - mean]],
            fmt="D", color="black", capsize=4, zorder=4,
        )  # fmt: skip
    ax.set_yticks(range(len(groups)), list(groups))
    ax.set_xlabel(f"{metric} (dots: jobs; diamond: mean, bars: range)")
    ax.grid(True, axis="x", alpha=0.3)


def trend_axes(ax: Any, comparison: Comparison, finished: Sequence[dict[str, Any]]) -> None:
    """Mean of the first test metric over seeds against ``x`` (log scale if it spans 10x)."""
    x, metric = comparison.x, comparison.test_metrics[0]
    series: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for label, rows in grouped(finished).items():
        for row in rows:
            try:
                value = float(row[x])
            except ValueError:
                continue
            if math.isfinite(row.get(metric, math.nan)):
                series[label][value].append(row[metric])
    xs = [value for points in series.values() for value in points]
    for label, points in sorted(series.items()):
        at = sorted(points)
        ax.plot(at, [sum(points[v]) / len(points[v]) for v in at], marker="o", label=label)
    if xs and min(xs) > 0 and max(xs) >= 10 * min(xs):
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(xs)), [f"{x:g}" for x in sorted(set(xs))])
        ax.minorticks_off()
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (mean over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize="small")


def history_axes(ax: Any, comparison: Comparison, finished: Sequence[dict[str, Any]]) -> None:
    from matplotlib.ticker import MaxNLocator

    metric = comparison.metric_column
    points = [(i, r[metric]) for i, r in enumerate(comparison.rows) if r in finished]
    points = [(i, v) for i, v in points if math.isfinite(v)]
    if points:
        xs, ys = zip(*points, strict=True)
        pick = max if comparison.mode == "max" else min
        best_so_far = [pick(ys[: k + 1]) for k in range(len(ys))]
        ax.scatter(xs, ys, label="trial", zorder=3)
        ax.step(xs, best_so_far, where="post", color="tab:red", label="best so far")
    failed = [i for i, r in enumerate(comparison.rows) if r not in finished]
    for i in failed:
        ax.axvline(i, color="grey", alpha=0.3, linestyle=":")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (in start order; dotted: failed)")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend()


def write_all(comparison: Comparison, out_dir: Path) -> list[Path]:
    """comparison.csv, comparison.md and comparison.png in ``out_dir``; their paths."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"comparison.{ext}" for ext in ("csv", "md", "png")]
    if not comparison.rows:
        return []
    write_csv(comparison, paths[0])
    paths[1].write_text(f"{markdown(comparison)}\n\n{summary(comparison)}\n")
    figure = chart(comparison)
    figure.savefig(paths[2])
    plt.close(figure)
    return paths
