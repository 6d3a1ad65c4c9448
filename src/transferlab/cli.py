"""The ``transferlab`` command: ``train`` (Hydra), ``compare`` (sweeps), ``ui`` (MLflow),
``server`` (a team's MLflow server), ``reproduce``, and ``predict`` and ``export`` for a
trained run.

Kept light: nothing heavy is imported until a subcommand needs it, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from transferlab import __version__
from transferlab.errors import UserError

USAGE = """\
usage: transferlab <command> [arguments]

commands:
  train   fine-tune, validate, test and log one run; -m for a sweep
          (Hydra overrides: transferlab train model=resnet18 optimizer.lr=3e-4 seed=1;
           transferlab train --help lists every config group and option;
           transferlab train resume=<run id | run folder> continues a stopped run)
  compare print and save the comparison table and chart of a sweep or experiment
          (transferlab compare multirun/train/<date>/<time> | <parent run id> | <experiment>)
  ui      serve the MLflow dashboard for the local run store (mlruns/ here) and print the
          link to an experiment's runs table (transferlab ui [--experiment NAME] [--open])
  server  start an MLflow tracking server for a team on 127.0.0.1: PostgreSQL when
          installed (else sqlite) for runs, artifacts served from its folder
          (transferlab server [--port 5000] [--root mlflow-server]
           [--backend auto|postgresql|sqlite]; then: transferlab train tracking=server)
  reproduce
          train again from what a finished run recorded and say whether the results match
          (transferlab reproduce <run id | run folder>)
  predict a trained run's predictions for images: top-k classes into a CSV, or (segmentation)
          a mask PNG per image and a CSV of class shares
          (transferlab predict run=<run id | run folder | checkpoint> images=<file | folder>
           [out=predictions.csv | predictions/] [top_k=5] [batch_size=64] [store_dir=mlruns])
  eval    test a trained run again: on its own test split or other data, clean or under
          the corruption suite, into a new MLflow run nested under it
          (transferlab eval run=<run id | run folder | checkpoint> [data=... data.<key>=...]
           [shift=corruptions shift.<key>=...] [store_dir=mlruns])
  explain Grad-CAM heat maps of a trained run: where in each image it found its evidence
          (transferlab explain run=<run id | run folder | checkpoint> images=<file | folder>
           [out=explain] [class=predicted | <class name>] [batch_size=16] [store_dir=mlruns])
  embed   a trained task=embedding run's embeddings of images: embeddings.npy and index.csv
          (transferlab embed run=<run id | run folder | checkpoint> images=<file | folder>
           [out=embeddings] [batch_size=64] [store_dir=mlruns])
  verify  whether two images show the same identity, at a task=embedding run's threshold
          (transferlab verify run=<run id | run folder | checkpoint> a.jpg b.jpg)
  export  write a trained run's network as ONNX, checked against PyTorch with onnxruntime
          (transferlab export run=<run id | run folder | checkpoint> format=onnx
           [out=model.onnx] [store_dir=mlruns])

options:
  -h, --help     show this help
  --version      print the version

Start with: transferlab train   (1-3 minutes on 2 CPU cores), then: transferlab ui
"""

# One server process: the dashboard has one reader here, and 2-core machines are common.
SERVER_WORKERS = "1"


def train(argv: list[str]) -> int:
    from transferlab import train as train_module

    train_module.launch(argv)
    return 0


def ui(argv: list[str]) -> int:
    from pathlib import Path

    import mlflow
    from mlflow.exceptions import MlflowException

    from transferlab.tracking import review
    from transferlab.tracking.redact import redact_uri
    from transferlab.tracking.store import artifact_root, existing_store_uri

    parser = argparse.ArgumentParser(
        prog="transferlab ui",
        description="Serve the MLflow dashboard on 127.0.0.1 and print the link to an "
        "experiment's runs table, with the monitored and test metrics as columns.",
    )
    parser.add_argument("--store-dir", default="mlruns", help="local store folder (mlruns)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--experiment", help="experiment to show (default: the one of the newest run)"
    )
    parser.add_argument("--open", action="store_true", help="also open the link in a browser")
    args = parser.parse_args(argv)
    uri = existing_store_uri(args.store_dir)
    if uri.startswith(("http://", "https://")):  # the runs table there (no view written)
        experiment = review.review_experiment(mlflow.MlflowClient(uri), args.experiment)
        link = redact_uri(uri)
        if experiment is not None:
            link = review.runs_table_url(link, experiment.experiment_id)
        print(f"MLFLOW_TRACKING_URI points to a server already: open {link}")
        return 0
    # None of MLflow's job runners (GenAI judges and scorers: 9 processes), and no usage
    # reports: the server would fetch their settings from the internet.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    base = f"http://127.0.0.1:{args.port}"
    link = f"{base}/"
    client = mlflow.MlflowClient(uri)
    experiment = review.review_experiment(client, args.experiment)
    if experiment is not None:
        try:
            view = review.save_review_view(client, experiment.experiment_id)
        except MlflowException as err:  # a read-only store: the table without our columns
            print(f"note: the metric columns are not preset ({str(err).splitlines()[0]})")
            view = None
        link = review.runs_table_url(base, experiment.experiment_id, view)
    artifacts = artifact_root(uri) or Path(args.store_dir).expanduser().resolve() / "artifacts"
    command = [
        sys.executable, "-m", "mlflow", "ui",
        "--backend-store-uri", uri,
        "--default-artifact-root", artifacts.as_uri(),
        "--host", "127.0.0.1",
        "--port", str(args.port),
        "--workers", SERVER_WORKERS,
    ]  # fmt: skip
    what = f"experiment {experiment.name!r}" if experiment is not None else "no runs yet"
    print(f"MLflow dashboard for {redact_uri(uri)} ({what}; Ctrl+C stops it):\n  {link}")
    sys.stdout.flush()
    if args.open:
        review.open_later(link, f"{base}/health")
    os.execv(sys.executable, command)
    return 0


def server(argv: list[str]) -> int:
    import time
    from pathlib import Path

    from transferlab.signals import Interrupted, stop_on_signals
    from transferlab.tracking.server import (
        BACKENDS,
        check_port_free,
        describe_store,
        shown_command,
        team_server,
    )

    parser = argparse.ArgumentParser(
        prog="transferlab server",
        description="Start an MLflow tracking server on 127.0.0.1 for a team: runs and models "
        "in PostgreSQL (Debian's postgresql package; else sqlite), artifacts in a local "
        "folder served by the server. Ctrl+C stops it.",
    )
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--root", default="mlflow-server", help="folder for the database and the artifacts"
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto",
        help="auto: PostgreSQL when installed, else sqlite",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=None, help="server processes (sqlite 1, PostgreSQL 4)"
    )
    args = parser.parse_args(argv)
    check_port_free(args.port)
    started = time.monotonic()
    try:
        with (
            stop_on_signals(),
            team_server(Path(args.root), args.port, args.backend, args.workers) as (running, why),
        ):
            root = Path(args.root).expanduser().resolve()
            print(
                f"\nMLflow tracking server at {running.url} "
                f"(started in {time.monotonic() - started:.1f} s)\n"
                f"  runs and models: {describe_store(running.store)} ({why})\n"
                f"  artifacts:       {root / 'artifacts'}, served by the server\n"
                f"  command:         {shown_command(running)}\n"
                f"Point runs at it:  export MLFLOW_TRACKING_URI={running.url}\n"
                "                   transferlab train tracking=server\n"
                "Ctrl+C stops it.",
                flush=True,
            )
            code = running.process.wait()
    except (Interrupted, KeyboardInterrupt):
        print("MLflow server stopped.", flush=True)
        return 0
    raise UserError(
        f"the MLflow server stopped by itself (exit status {code}); see its output above"
    )


def compare(argv: list[str]) -> int:
    from transferlab.sweeps.compare import main as compare_main

    return compare_main(argv)


def reproduce(argv: list[str]) -> int:
    from transferlab.reproduce import main as reproduce_main

    return reproduce_main(argv)


def predict(argv: list[str]) -> int:
    from transferlab.predict import main as predict_main

    return predict_main(argv)


def evaluate(argv: list[str]) -> int:
    from transferlab.evaluate import main as evaluate_main

    return evaluate_main(argv)


def explain(argv: list[str]) -> int:
    from transferlab.explain import main as explain_main

    return explain_main(argv)


def embed(argv: list[str]) -> int:
    from transferlab.embed import embed_main

    return embed_main(argv)


def verify(argv: list[str]) -> int:
    from transferlab.embed import verify_main

    return verify_main(argv)


def export(argv: list[str]) -> int:
    from transferlab.export import main as export_main

    return export_main(argv)


def key_value_args(
    argv: list[str], defaults: dict[str, str | None], usage: str
) -> dict[str, str] | None:
    """``key=value`` arguments over ``defaults`` (None: required); None after printing
    ``usage`` for ``-h``/``--help``. Unknown keys and missing required ones are one line."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage, end="")
        return None
    values = dict(defaults)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in defaults:
            raise UserError(
                f"unknown argument {arg!r}: pass {', '.join(f'{k}=...' for k in defaults)}"
            )
        values[key] = value
    missing = [key for key, value in values.items() if value is None]
    if missing:
        raise UserError(f"missing {', '.join(f'{k}=...' for k in missing)}; see --help")
    return values  # type: ignore[return-value]


COMMANDS = {
    "train": train,
    "compare": compare,
    "ui": ui,
    "server": server,
    "reproduce": reproduce,
    "predict": predict,
    "eval": evaluate,
    "explain": explain,
    "embed": embed,
    "verify": verify,
    "export": export,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] == "--version":
        print(f"transferlab {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"transferlab: unknown command {argv[0]!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except UserError as err:
        print(f"transferlab: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
