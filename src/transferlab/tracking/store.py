"""Where runs are stored: a local sqlite store under ``mlruns/`` unless a URI is given.

A store is checked before MLflow touches it: MLflow retries an unwritable sqlite file or an
unreachable server for minutes, then fails with a long traceback.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from transferlab.errors import UserError
from transferlab.tracking.redact import redact_text, redact_uri

# How long to wait for a tracking server to answer before giving up.
SERVER_TIMEOUT_S = 5.0
# A server that stops answering mid-run: MLflow's client retries each request with back-off,
# by default for about 4 minutes (7 retries) and 120 s per attempt, then raises. A run's
# client gives up after about 30 s (retries after 0, 2, 4, 8 and 16 s; 30 s per attempt):
# a restarted server loses nothing, and past that the run goes on without it
# (``tracking.fallback``). These are MLflow's variables: values set in the environment win.
CLIENT_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def default_store_uri(store_dir: str | os.PathLike) -> str:
    """``sqlite:///<absolute store_dir>/mlflow.db``: absolute so every Hydra job shares it."""
    return f"sqlite:///{Path(store_dir).expanduser().resolve() / 'mlflow.db'}"


def resolve_tracking_uri(
    uri: str | None, store_dir: str | os.PathLike, server: bool = False
) -> str:
    """``uri`` (e.g. from MLFLOW_TRACKING_URI) when given, else the local sqlite store;
    checked to be usable (:func:`check_store`). ``server`` (``tracking=server``): ``uri``
    must name a tracking server."""
    if server:
        check_server_uri(uri)
    uri = uri or default_store_uri(store_dir)
    check_store(uri)
    if is_server(uri):
        for name, value in CLIENT_RETRIES.items():
            os.environ.setdefault(name, value)
    if redact_uri(uri) != uri:
        # MLflow prints a run's link with the URI as given, credentials and all.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return uri


def check_server_uri(uri: str | None) -> None:
    """``tracking=server`` has an ``http(s)://`` URI to go to."""
    if not uri:
        raise UserError(
            "tracking=server needs the server's URI: set MLFLOW_TRACKING_URI=http://host:5000 "
            "or pass tracking.uri=http://host:5000 (`transferlab server` starts one on this machine)"
        )
    if not is_server(uri):
        raise UserError(
            f"tracking=server needs an http(s):// URI, not {redact_uri(uri)}: point "
            "MLFLOW_TRACKING_URI (or tracking.uri) at the server, or use tracking=mlflow"
        )


def existing_store_uri(store_dir: str | os.PathLike) -> str:
    """For commands that read runs: MLFLOW_TRACKING_URI if set, else the local store, which
    must exist already (a one-line error says how to make one)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if is_server(uri):
            check_server(uri)
        return uri
    if not (Path(store_dir).expanduser() / "mlflow.db").exists():
        raise UserError(
            f"no run store at {Path(store_dir).expanduser().resolve()}/mlflow.db: run "
            "`transferlab train` here first, or pass --store-dir DIR"
        )
    return default_store_uri(store_dir)


def sqlite_path(uri: str) -> Path | None:
    """The absolute database file of a ``sqlite:`` URI; None for other stores and in-memory."""
    if not uri.startswith("sqlite://"):
        return None
    path = redact_uri(uri).removeprefix("sqlite://").removeprefix("/")  # the query goes too
    if path in ("", ":memory:"):
        return None
    return Path(path).resolve()


def artifact_root(tracking_uri: str) -> Path | None:
    """Where a sqlite store keeps artifacts: ``artifacts/`` next to its database file, so
    they stay with the runs wherever the command is run from (None: the server decides)."""
    database = sqlite_path(tracking_uri)
    return database.parent / "artifacts" if database is not None else None


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_store(uri: str) -> None:
    """A one-line error, at once, for a store MLflow could not use."""
    database = sqlite_path(uri)
    if database is not None:
        check_sqlite(database, uri)
    elif is_server(uri):
        check_server(uri)


def check_sqlite(database: Path, uri: str) -> None:
    """The database's folder exists (created if missing) and takes new files (sqlite writes
    its journal next to the database), and the database, if there, can be written."""
    fix = "set MLFLOW_TRACKING_URI (or tracking.uri) to a sqlite file in a folder you can write"
    folder = database.parent
    try:
        step = f"cannot create the folder {folder}"
        folder.mkdir(parents=True, exist_ok=True)
        step = f"cannot create files in {folder}"
        with tempfile.TemporaryFile(dir=folder):
            pass
        step = f"cannot write {database}"
        if database.exists():
            with database.open("r+b"):
                pass
    except OSError as err:
        raise UserError(
            f"MLflow store {redact_uri(uri)}: {step} ({err.strerror or err}); {fix}"
        ) from None


def check_server(uri: str, timeout: float = SERVER_TIMEOUT_S) -> None:
    """The tracking server answers (any HTTP answer, or a TLS handshake, counts)."""
    reason = why_no_answer(uri, timeout)
    if reason is not None:
        raise UserError(
            f"cannot reach the MLflow tracking server {redact_uri(uri).rstrip('/')} ({reason}): "
            "start it, or set MLFLOW_TRACKING_URI (or tracking.uri) to a server that runs"
        )


def server_answers(uri: str, timeout: float = SERVER_TIMEOUT_S) -> bool:
    return why_no_answer(uri, timeout) is None


def why_no_answer(uri: str, timeout: float) -> str | None:
    """Why the server at ``uri`` does not answer ``/health`` (None: it answers)."""
    import ssl
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{redact_uri(uri).rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, ssl.SSLError):
            return None  # it answered; MLflow has its own TLS settings
        return str(getattr(reason, "strerror", None) or reason)
    return None


def ensure_experiment(
    name: str, tracking_uri: str, store_dir: str | os.PathLike | None = None
) -> str:
    """The id of experiment ``name``, created if missing (a sqlite store's with its artifacts
    under :func:`artifact_root`). ``store_dir`` is not used: the URI says where the store is."""
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
        root = artifact_root(tracking_uri)
        location = (root / name).as_uri() if root is not None else None
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
            f"cannot use the MLflow store {redact_uri(tracking_uri)}: "
            f"{redact_text(str(err).splitlines()[0])}"
        ) from None
