"""One MLflow run per job, owned by us and shared with Lightning's logger."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import MLFlowLogger

from transferlab.tracking.params import check_lengths


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger, writing into a run that ``start_run`` owns.

    The config is logged once, in full, by ``TrackedRun.log_params`` (Lightning's logger
    would cut every value at 250 characters), and the run is ended by ``start_run``, so
    that a crash after ``fit`` still marks it FAILED.
    """

    def log_hyperparams(self, params: Any) -> None:
        pass

    def finalize(self, status: str = "success") -> None:
        pass


class TrackedRun:
    """An active MLflow run: params, metrics, tags and artifacts go through here."""

    def __init__(self, run_id: str, experiment_id: str, tracking_uri: str) -> None:
        import mlflow

        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        self.client = mlflow.MlflowClient(tracking_uri)

    def logger(self) -> RunLogger:
        return RunLogger(tracking_uri=self.tracking_uri, run_id=self.run_id)

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        check_lengths(params)
        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, float(value), step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)


@contextlib.contextmanager
def start_run(
    tracking_uri: str,
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[TrackedRun]:
    """Start a run; end it FINISHED, FAILED (with the error as a tag) or KILLED."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    active = mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        tags=dict(tags or {}),
        parent_run_id=parent_run_id,
    )
    run = TrackedRun(active.info.run_id, experiment_id, tracking_uri)
    try:
        yield run
    except (KeyboardInterrupt, SystemExit):  # Ctrl+C; SIGTERM (Lightning raises SystemExit)
        mlflow.end_run("KILLED")
        raise
    except BaseException as err:
        with contextlib.suppress(Exception):
            run.set_tags({"error": f"{type(err).__name__}: {err}"[:5000]})
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")
