"""The README's robustness chart: each run's test metric against corruption severity.

    transferlab train -m experiment=robustness
    python scripts/robustness_figure.py --experiment robustness --out docs/robustness.png

Reads the runs of an experiment that were evaluated under the corruption suite
(``shift/<corruption>/<metric>`` histories, severity as step) from the local store (or
``MLFLOW_TRACKING_URI``) and draws, per run, the mean over the corruptions at each severity
(severity 0: the clean test value), labelled by the run's ``finetune`` tag.
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow

from transferlab.tracking.store import existing_store_uri


def severity_means(client: mlflow.MlflowClient, run, metric: str) -> dict[int, float]:
    """Severity -> mean of ``shift/*/<metric>`` over the corruptions; 0 -> the clean value."""
    by_severity: dict[int, list[float]] = defaultdict(list)
    for name in run.data.metrics:
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "shift" and parts[2] == metric:
            if parts[1] in ("mean", "relative_drop"):
                continue
            for point in client.get_metric_history(run.info.run_id, name):
                by_severity[point.step].append(point.value)
    means = {s: statistics.fmean(v) for s, v in sorted(by_severity.items())}
    return {0: run.data.metrics[f"test/{metric}"], **means}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="robustness")
    parser.add_argument("--metric", default="acc")
    parser.add_argument("--store-dir", default="mlruns")
    parser.add_argument("--out", type=Path, default=Path("robustness.png"))
    args = parser.parse_args()
    client = mlflow.MlflowClient(existing_store_uri(args.store_dir))
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {args.store_dir}")
    runs = [
        run
        for run in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
        if f"shift/mean/{args.metric}" in run.data.metrics and "evaluates" not in run.data.tags
    ]
    figure, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    for run in sorted(runs, key=lambda r: r.info.start_time):
        means = severity_means(client, run, args.metric)
        label = run.data.tags.get("finetune", run.info.run_name)
        clean, shifted = means[0], run.data.metrics[f"shift/mean/{args.metric}"]
        ax.plot(
            list(means),
            list(means.values()),
            marker="o",
            label=f"{label}: clean {clean:.3f}, corrupted {shifted:.3f}",
        )
    ax.set_xticks(range(6), ["clean", "1", "2", "3", "4", "5"])
    ax.set_xlabel("corruption severity (mean over the suite's 12 corruptions)")
    ax.set_ylabel(f"test {args.metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"experiment={args.experiment}: accuracy under corruption", fontsize=10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
