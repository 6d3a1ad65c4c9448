"""The Hydra callback that gives every sweep an MLflow parent run and a comparison at its end.

``on_multirun_start`` runs once, in the process that launches the jobs, before any job:
it creates the store, the experiment and the parent run (so parallel jobs never race to
create them) and hands the parent's id to the jobs in an environment variable, which the
joblib and submitit launchers pass on to their worker processes. ``on_multirun_end`` runs
after the last job, failed jobs included: it ranks the child runs, logs the comparison
table and chart to the parent, tags the best child, registers the best child's model with
the alias ``champion`` and ends the parent.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from transferlab.tracking.redact import redact_logging, redact_text, redact_uri, redact_values

# The parent run id, for the jobs of the sweep (read by transferlab.train).
PARENT_RUN_ENV = "TRANSFERLAB_SWEEP_RUN_ID"
SWEEP_FILE = "sweep_run.json"


def sweeper_kind(config: DictConfig) -> str:
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default=""))
    return "optuna" if "optuna" in target.lower() else "grid"


def study_key(config: DictConfig) -> str | None:
    """What identifies an Optuna study across runs of the same command (None: not stored)."""
    sweeper = config.hydra.sweeper
    if sweeper_kind(config) != "optuna" or not sweeper.get("storage"):
        return None
    return redact_text(f"{sweeper.storage}#{sweeper.study_name}")


def sweep_name(config: DictConfig) -> str:
    """The experiment or search the sweep runs, else its command-line overrides."""
    choices = config.hydra.runtime.choices
    for group in ("hparams_search", "experiment"):
        if choices.get(group):
            return f"sweep {group}={choices[group]}"
    return redact_text("sweep " + " ".join(config.hydra.overrides.task))[:250]


class MlflowSweepCallback(Callback):
    """One MLflow parent run per Hydra multirun (see the module docstring)."""

    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.tracking_uri: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from transferlab.tracking.store import ensure_experiment, resolve_tracking_uri

        redact_logging()  # Hydra logs each job's overrides
        tracking = config.tracking
        if not tracking.enabled:
            return
        self.tracking_uri = resolve_tracking_uri(
            tracking.uri, tracking.store_dir, tracking.get("server", False)
        )
        experiment_id = ensure_experiment(
            tracking.experiment_name, self.tracking_uri, tracking.store_dir
        )
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        self.parent_run_id = open_parent(self.tracking_uri, experiment_id, config, sweep_dir)
        os.environ[PARENT_RUN_ENV] = self.parent_run_id
        # A sweep stopped by a signal never reaches on_multirun_end: end the parent KILLED.
        atexit.register(self.kill_open_parent)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(
            json.dumps(
                {
                    "parent_run_id": self.parent_run_id,
                    # No credentials: `transferlab compare` takes them from the environment.
                    "tracking_uri": redact_uri(self.tracking_uri),
                    "experiment_id": experiment_id,
                },
                indent=2,
            )
        )
        print(
            f"Sweep parent run: {self.parent_run_id} in {redact_uri(self.tracking_uri)}",
            flush=True,
        )

    def kill_open_parent(self) -> None:
        if self.parent_run_id is None:
            return
        import mlflow

        mlflow.MlflowClient(self.tracking_uri).set_terminated(self.parent_run_id, "KILLED")
        self.parent_run_id = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is None:
            return
        os.environ.pop(PARENT_RUN_ENV, None)
        import mlflow

        from transferlab.tracking.fallback import Fallback

        client = mlflow.MlflowClient(self.tracking_uri)
        status, failed = "FAILED", 0
        parent_run_id, self.parent_run_id = self.parent_run_id, None
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        gone = False
        try:
            status, failed = close_parent(client, parent_run_id, sweep_dir)
            crown_champion(client, parent_run_id, config.tracking.get("registered_model"))
        except Exception as err:
            gone = Fallback(self.tracking_uri).gone(err)
            if not gone:
                raise
            print(
                f"transferlab: error: the MLflow server {redact_uri(self.tracking_uri)} went "
                f"away: the sweep's parent run {parent_run_id} was neither compared nor ended; "
                f"each job's outputs are in {sweep_dir}",
                file=sys.stderr,
            )
            raise SystemExit(1) from None
        finally:
            if not gone:
                client.set_terminated(parent_run_id, status)
        from transferlab.signals import stopped

        if failed and sweeper_kind(config) == "grid" and stopped() is None:
            # SystemExit passes through Hydra's callback guard: the exit status tells
            # scripts and CI that the grid is incomplete. (Optuna expects failed trials;
            # a sweep stopped by a signal exits with the signal's status instead.)
            print(f"transferlab: error: {failed} job(s) of the sweep failed", file=sys.stderr)
            raise SystemExit(1)


def open_parent(tracking_uri: str, experiment_id: str, config: DictConfig, sweep_dir: Path) -> str:
    """Create the parent run, or reopen the one of a stored Optuna study being resumed."""
    import mlflow

    from transferlab.tracking import provenance
    from transferlab.tracking.liveness import process_tags

    client = mlflow.MlflowClient(tracking_uri)
    tags = {
        "sweep.parent": "true",
        "sweep.dir": str(sweep_dir),
        "sweep.overrides": " ".join(config.hydra.overrides.task) or "(none)",
        "sweep.sweeper": sweeper_kind(config),
        "sweep.launcher": str(OmegaConf.select(config, "hydra.launcher._target_")).rsplit(".")[-1],
        "sweep.params": json.dumps(
            OmegaConf.to_container(config.hydra.sweeper.get("params") or OmegaConf.create()),
            sort_keys=True,
        ),
        "sweep.monitor": str(config.monitor),
        "sweep.mode": str(config.mode),
        "command": provenance.command_line(),
        **process_tags(),
    }
    tags = redact_values(tags)  # overrides and storage may hold credentials
    key = study_key(config)
    if key is not None:
        tags["sweep.study"] = key
        previous = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`sweep.study` = '{key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if previous:
            run_id = previous[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            for name, value in tags.items():
                client.set_tag(run_id, name, value)
            return run_id
    run = client.create_run(experiment_id, run_name=sweep_name(config), tags=tags)
    return run.info.run_id


def close_parent(client: Any, parent_run_id: str, sweep_dir: Path) -> tuple[str, int]:
    """Rank the children, log the comparison to the parent and the sweep dir.

    Returns the parent's final status and the number of failed jobs.
    """
    from transferlab.reports import comparison as cmp

    result = cmp.load_sweep(client, parent_run_id)
    paths = cmp.write_all(result, sweep_dir)
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            (Path(tmp) / path.name).write_bytes(path.read_bytes())
        if paths:
            client.log_artifacts(parent_run_id, tmp)
    best = result.best()
    for row in result.rows:
        if row is best:
            client.set_tag(row["run_id"], "sweep.best", "true")
        elif client.get_run(row["run_id"]).data.tags.get("sweep.best") == "true":
            client.delete_tag(row["run_id"], "sweep.best")  # a resumed study's former best
    metrics = {"sweep/jobs": len(result.rows), "sweep/failed": result.failed}
    if best is not None:
        metrics[f"best/{result.monitor}"] = best[result.metric_column]
        client.set_tag(parent_run_id, "sweep.best_run_id", best["run_id"])
        client.set_tag(parent_run_id, "sweep.best_overrides", best["overrides"])
    client.set_tag(parent_run_id, "mlflow.note.content", cmp.description(result, client))
    for name, value in metrics.items():
        client.log_metric(parent_run_id, name, float(value))
    print(f"\n{cmp.markdown(result)}\n\n{cmp.summary(result)}", flush=True)
    print(
        f"Comparison: {sweep_dir}/comparison.md (.csv, .png); "
        f"again with: transferlab compare {sweep_dir}",
        flush=True,
    )
    interrupted = any(row["status"] in ("KILLED", "RUNNING") for row in result.rows)
    return ("KILLED" if interrupted else "FINISHED"), result.failed


def crown_champion(client: Any, parent_run_id: str, name: str | None) -> None:
    """Register the best child's model as ``name`` with the alias ``champion`` (nothing for
    a null name or a sweep without a best child). A failure is one warning line: the
    sweep's results are recorded already."""
    from transferlab.tracking.model import CHAMPION, register_champion
    from transferlab.tracking.redact import warn_failed

    best = client.get_run(parent_run_id).data.tags.get("sweep.best_run_id")
    if not name or best is None:
        return
    try:
        version = register_champion(client, best, name, tags={"sweep.parent_run_id": parent_run_id})
    except Exception as err:  # a bug or an odd store must not fail a finished sweep
        warn_failed(f"the best model was not registered as {name!r}", err)
        return
    if version is None:
        print(
            f"The best run {best} has no MLflow model (tracking.log_model=false?): "
            f"nothing registered as {name!r}",
            flush=True,
        )
        return
    print(
        f"Registered the best run's model as {name!r} version {version.version}, alias "
        f"{CHAMPION!r}: models:/{name}@{CHAMPION}",
        flush=True,
    )
