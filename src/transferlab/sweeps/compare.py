"""``transferlab compare``: a sweep's (or an experiment's) table, CSV, Markdown and chart."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from transferlab.errors import UserError
from transferlab.sweeps.callback import SWEEP_FILE
from transferlab.tracking.redact import redact_uri

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def sweep_store_uri(stored: str) -> str:
    """The store a sweep file names. The file holds the URI without its credentials: when
    MLFLOW_TRACKING_URI is the same store, it is used with its own; otherwise MLflow takes
    them from MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN, if set."""
    from transferlab.tracking.store import check_server, is_server

    environment = os.environ.get("MLFLOW_TRACKING_URI", "")
    uri = environment if environment and redact_uri(environment) == stored else stored
    if is_server(uri):
        check_server(uri)
    return uri


def load(target: str, store_dir: str, monitor: str | None, mode: str | None, x: str | None):
    """The comparison ``target`` names, and the folder its files go to by default."""
    import mlflow

    from transferlab.reports import comparison as cmp
    from transferlab.tracking.store import existing_store_uri

    sweep_file = Path(target) / SWEEP_FILE
    if sweep_file.is_file():
        info = json.loads(sweep_file.read_text())
        client = mlflow.MlflowClient(sweep_store_uri(info["tracking_uri"]))
        return cmp.load_sweep(client, info["parent_run_id"], x), Path(target)
    if Path(target).is_dir():
        raise UserError(
            f"{target} has no {SWEEP_FILE}: it is not the folder of a sweep run with tracking on"
        )
    uri = existing_store_uri(store_dir)
    client = mlflow.MlflowClient(uri)
    if RUN_ID.match(target):
        from mlflow.exceptions import MlflowException

        try:
            client.get_run(target)
        except MlflowException:
            raise UserError(f"no run {target} in {redact_uri(uri)}") from None
        return cmp.load_sweep(client, target, x), Path("comparison") / target[:8]
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        names = ", ".join(e.name for e in client.search_experiments())
        raise UserError(
            f"{target!r} is not a sweep folder, a run id or an experiment in {redact_uri(uri)} "
            f"(experiments: {names or 'none'})"
        )
    return cmp.load_experiment(client, experiment, monitor, mode, x), Path("comparison") / target


def main(argv: list[str]) -> int:
    from transferlab.reports import comparison as cmp

    parser = argparse.ArgumentParser(
        prog="transferlab compare",
        description="Compare the runs of a sweep (its folder or parent run id) or of an "
        "experiment: print the table and write comparison.csv, .md and .png.",
    )
    parser.add_argument("target", help="sweep folder (multirun/...), parent run id, or experiment")
    parser.add_argument("--out", type=Path, help="where the files go (default: the sweep folder)")
    parser.add_argument("--store-dir", default="mlruns", help="local store folder (mlruns)")
    parser.add_argument(
        "--monitor", help="for an experiment: metric to rank by (default: the runs' monitor)"
    )
    parser.add_argument("--mode", choices=("max", "min"), help="default: the runs' mode")
    parser.add_argument(
        "--x",
        metavar="PARAM",
        help="chart the test metric against this param, one line per "
        "configuration (e.g. --x data.samples_per_class)",
    )
    args = parser.parse_args(argv)

    comparison, default_out = load(args.target, args.store_dir, args.monitor, args.mode, args.x)
    if not comparison.rows:
        raise UserError(f"{args.target}: no runs to compare yet")
    print(f"{cmp.markdown(comparison)}\n\n{cmp.summary(comparison)}")
    paths = cmp.write_all(comparison, args.out or default_out)
    print("Wrote " + ", ".join(str(p) for p in paths))
    return 0
