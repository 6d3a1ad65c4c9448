"""Print a Markdown table of an MLflow experiment's runs; optionally chart accuracy vs a param.

    python scripts/experiment_report.py --experiment freeze_comparison
    python scripts/experiment_report.py --experiment data_efficiency \
        --x data.samples_per_class --chart data_efficiency.png
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from transferlab.reports.experiments import accuracy_chart, experiment_rows, markdown_table
from transferlab.tracking.store import default_store_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--store-dir", default="mlruns", help="local store (default: mlruns)")
    parser.add_argument("--x", help="a param to group by and chart against (log scale)")
    parser.add_argument("--chart", type=Path, help="write the chart here (PNG)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()

    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_store_uri(args.store_dir)
    group_by = [args.x] if args.x else []
    rows = experiment_rows(args.experiment, uri, group_by)
    if args.x:
        rows.sort(key=lambda r: (r["strategy"], float(r[args.x])))
    else:
        rows.sort(key=lambda r: -r["test/acc"])
    table = markdown_table(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.chart:
        if not args.x:
            parser.error("--chart needs --x")
        accuracy_chart(rows, args.x, args.experiment).savefig(args.chart)
        print(f"chart: {args.chart}")


if __name__ == "__main__":
    main()
