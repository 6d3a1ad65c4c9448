"""One MLflow run per job, owned by us and shared with Lightning's logger."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pytorch_lightning.loggers import MLFlowLogger

from transferlab.tracking.fallback import Fallback
from transferlab.tracking.params import check_lengths
from transferlab.tracking.redact import redact_values

DESCRIPTION_TAG = "mlflow.note.content"  # what MLflow shows as a run's description
# Lightning's name for the per-batch values of a metric logged both per batch and per epoch.
PER_BATCH_SUFFIX = "_step"
SIGNIFICANT_DIGITS = 7  # a float32's precision: the digits past it are noise

T = TypeVar("T")


def readable(value: Any) -> float:
    """``value`` as a float without float32's noise: 0.85619997 (0.8562 in float32) is
    0.8562; an integer-valued or non-finite one is unchanged."""
    number = float(value)
    if not math.isfinite(number) or number.is_integer():
        return number
    return float(f"{number:.{SIGNIFICANT_DIGITS}g}")


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger, writing into a run that ``start_run`` owns.

    The config is logged once, in full, by ``TrackedRun.log_params`` (Lightning's logger
    would cut every value at 250 characters), and the run is ended by ``start_run``, so
    that a crash after ``fit`` still marks it FAILED. Metrics go through the run's
    ``fallback``: kept locally once the server is gone.
    """

    def __init__(
        self,
        *args: Any,
        logged_through: Mapping[str, int] | None = None,
        fallback: Fallback | None = None,
        **kw: Any,
    ):
        super().__init__(*args, **kw)
        self.fallback = fallback or Fallback(self._tracking_uri)
        # A resumed run: the last step of each metric already in its history. The steps
        # replayed from the checkpoint that were logged before the stop are not logged
        # twice, so the history has no duplicates (and, replayed, no gaps).
        self.logged_through = dict(logged_through or {})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Per-batch metrics (``*_step``) and Lightning's ``epoch`` at the global step; the
        others, per epoch or once, at the epoch Lightning sends with them, so MLflow charts
        them against the epoch."""
        metrics = {key: readable(value) for key, value in metrics.items()}
        epoch = metrics.get("epoch")
        per_batch = {
            k: v for k, v in metrics.items() if k.endswith(PER_BATCH_SUFFIX) or k == "epoch"
        }
        rest = {k: v for k, v in metrics.items() if k not in per_batch}
        send = super().log_metrics
        for group, at in ((per_batch, step), (rest, step if epoch is None else int(epoch))):
            if self.logged_through and at is not None:
                group = {k: v for k, v in group.items() if at > self.logged_through.get(k, -1)}
            if group:
                self.fallback.send(
                    "metrics", lambda g=group, a=at: send(g, a), {"step": at, "values": group}
                )

    def log_hyperparams(self, params: Any) -> None:
        pass

    def finalize(self, status: str = "success") -> None:
        pass


class TrackedRun:
    """An active MLflow run: params, metrics, tags and artifacts go through here."""

    def __init__(
        self,
        run_id: str,
        experiment_id: str,
        tracking_uri: str,
        folder: str | Path | None = None,
    ) -> None:
        import mlflow

        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        self.client = mlflow.MlflowClient(tracking_uri)
        # Once a tracking server is gone, what the run sends is kept in ``folder`` instead.
        self.fallback = Fallback(tracking_uri, folder)
        # Figures also logged at the root, for MLflow's Compare view (``log_figure``).
        self.compare_figures: set[str] = set()

    def logger(self, resumed: bool = False) -> RunLogger:
        """Lightning's logger into this run; ``resumed``: skip the steps logged already."""
        logged_through = None
        if resumed:
            logged_through = {
                key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                for key in self.client.get_run(self.run_id).data.metrics
            }
        return RunLogger(
            tracking_uri=self.tracking_uri,
            run_id=self.run_id,
            logged_through=logged_through,
            fallback=self.fallback,
        )

    @property
    def offline(self) -> bool:
        """The tracking server went away: nothing more reaches it."""
        return self.fallback.lost is not None

    def send(
        self, what: str, call: Callable[[], T], kept: Mapping[str, Any] | None = None
    ) -> T | None:
        """``call()``, a request to the store about ``what``; None once the server is gone."""
        return self.fallback.send(what, call, kept)

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        params = redact_values(params)  # no secret is ever recorded
        check_lengths(params)
        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):
            batch = items[start : start + 100]
            self.send(
                "params",
                lambda b=batch: self.client.log_batch(self.run_id, params=b),
                {"values": {p.key: p.value for p in batch}},
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """All of ``metrics`` in one request (one transaction), as Lightning's logger does."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, readable(value), now, step or 0) for key, value in metrics.items()]
        if batch:
            self.send(
                "metrics",
                lambda: self.client.log_batch(self.run_id, metrics=batch),
                {"step": step or 0, "values": {m.key: m.value for m in batch}},
            )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in redact_values(tags).items():
            self.send(
                "tags",
                lambda k=key, v=value: self.client.set_tag(self.run_id, k, v),
                {"values": {key: value}},
            )

    def log_dataset(
        self, name: str, digest: str, source: Mapping[str, str], tags: Mapping[str, str]
    ) -> None:
        """The run's data as an MLflow dataset input (name, digest, where it comes from), so
        the runs table's Dataset column shows it; ``tags`` go on the input."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        origin = CodeDatasetSource(tags=redact_values(dict(source)))
        dataset = MetaDataset(origin, name=name, digest=digest)
        input_tags = [InputTag("mlflow.data.context", "train+val+test")]
        input_tags += [InputTag(key, value) for key, value in redact_values(tags).items()]
        entity = DatasetInput(dataset._to_mlflow_entity(), input_tags)
        self.send(
            "the dataset input",
            lambda: self.client.log_inputs(self.run_id, datasets=[entity]),
            {"name": name, "digest": digest},
        )

    def describe(self, text: str) -> None:
        """The run's description in MLflow (markdown, shown on its page and in its table)."""
        self.set_tags({DESCRIPTION_TAG: text})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        where = f"{artifact_path}/" if artifact_path else ""
        self.send(
            f"the artifacts {where or './'}"
            if path.is_dir()
            else f"the artifact {where}{path.name}",
            lambda: log(self.run_id, str(path), artifact_path),
            {"path": str(path.resolve()), "artifact_path": artifact_path},
        )

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """``figure`` as ``artifact_file``; one of ``compare_figures`` also at the root of
        the run's artifacts, where MLflow's Compare view shows runs' figures side by side
        (it compares root-level artifacts only)."""

        def log() -> None:
            self.client.log_figure(self.run_id, figure, artifact_file)
            if artifact_file in self.compare_figures:
                self.client.log_figure(self.run_id, figure, Path(artifact_file).name)

        self.send(f"the figure {artifact_file}", log, {"artifact_file": artifact_file})

    def log_text(self, text: str, artifact_file: str) -> None:
        self.send(
            f"the text {artifact_file}",
            lambda: self.client.log_text(self.run_id, text, artifact_file),
            {"artifact_file": artifact_file, "text": text},
        )


@contextlib.contextmanager
def start_run(
    tracking_uri: str,
    experiment_id: str,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    run_id: str | None = None,
    folder: str | Path | None = None,
) -> Iterator[TrackedRun]:
    """Start a run (or reopen ``run_id`` to resume it); end it FINISHED, FAILED (with the
    error as a tag) or KILLED (a signal). The run records its host and process, so that a
    run whose process is killed outright can be found and ended later (``liveness``).
    ``folder``: where the run keeps what a tracking server gone mid-run did not get
    (``tracking.fallback``; the current folder if None)."""
    import mlflow

    from transferlab.signals import Interrupted
    from transferlab.tracking.liveness import process_tags

    mlflow.set_tracking_uri(tracking_uri)
    if run_id is not None:
        active = mlflow.start_run(run_id=run_id)
        mlflow.set_tags({**dict(tags or {}), **process_tags()})
    else:
        active = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name,
            tags={**dict(tags or {}), **process_tags()},
            parent_run_id=parent_run_id,
        )
    run = TrackedRun(active.info.run_id, experiment_id, tracking_uri, folder)
    try:
        yield run
    except (KeyboardInterrupt, SystemExit, Interrupted) as err:  # Ctrl+C, SIGTERM
        if isinstance(err, Interrupted) and not run.offline:
            with contextlib.suppress(Exception):
                stopped = f"stopped by {err}"
                run.set_tags({"error": stopped, DESCRIPTION_TAG: f"**Stopped** ({stopped})"})
        end_run(run, "KILLED")
        raise
    except BaseException as err:
        if not run.offline:
            with contextlib.suppress(Exception):
                error = f"{type(err).__name__}: {err}"[:5000]
                run.set_tags({"error": error, DESCRIPTION_TAG: f"**Failed**: {error}"})
        end_run(run, "FAILED")
        raise
    end_run(run, "FINISHED")


def end_run(run: TrackedRun, status: str) -> None:
    """End MLflow's active run ``status``; once the server is gone, only here: the status is
    kept with what was not logged."""
    import mlflow

    if run.offline:
        with no_retries(), contextlib.suppress(Exception):
            mlflow.end_run(status)  # forgets the run here before it asks the server
        run.fallback.keep(f"the status {status}")
    else:
        run.send(f"the status {status}", lambda: mlflow.end_run(status))


@contextlib.contextmanager
def no_retries() -> Iterator[None]:
    """MLflow's requests in this block fail at once instead of retrying."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
