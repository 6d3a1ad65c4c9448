"""Where runs are stored: a local sqlite store under ``mlruns/`` unless a URI is given."""

from __future__ import annotations

import os
from pathlib import Path

from transferlab.errors import UserError


def default_store_uri(store_dir: str | os.PathLike) -> str:
    """``sqlite:///<absolute store_dir>/mlflow.db``: absolute so every Hydra job shares it."""
    return f"sqlite:///{Path(store_dir).expanduser().resolve() / 'mlflow.db'}"


def resolve_tracking_uri(uri: str | None, store_dir: str | os.PathLike) -> str:
    """``uri`` (e.g. from MLFLOW_TRACKING_URI) when given, else the local sqlite store."""
    if uri:
        return uri
    Path(store_dir).expanduser().mkdir(parents=True, exist_ok=True)
    return default_store_uri(store_dir)


def existing_store_uri(store_dir: str | os.PathLike) -> str:
    """For commands that read runs: MLFLOW_TRACKING_URI if set, else the local store, which
    must exist already (a one-line error says how to make one)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if not (Path(store_dir).expanduser() / "mlflow.db").exists():
        raise UserError(
            f"no run store at {Path(store_dir).expanduser().resolve()}/mlflow.db: run "
            "`transferlab train` here first, or pass --store-dir DIR"
        )
    return default_store_uri(store_dir)


def artifact_root(store_dir: str | os.PathLike) -> Path:
    return Path(store_dir).expanduser().resolve() / "artifacts"


def ensure_experiment(name: str, tracking_uri: str, store_dir: str | os.PathLike) -> str:
    """The id of experiment ``name``, created (with artifacts under the store) if missing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        location = None
        if tracking_uri.startswith("sqlite:"):
            location = (artifact_root(store_dir) / name).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # Another job created it between our lookup and create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id
    except MlflowException as err:
        raise UserError(
            f"cannot use the MLflow store {tracking_uri}: {str(err).splitlines()[0]}"
        ) from None
