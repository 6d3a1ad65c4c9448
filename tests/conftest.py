"""Fixtures shared across test modules."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from clitools import SMOKE, train_in


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(working folder, run folder, MLflow run id) of one cheap real training run, shared by
    the tests of commands that use a trained run (predict, export, eval, explain, ...).
    Tests must not change what is in it; copy it first."""
    cwd = tmp_path_factory.mktemp("trained")
    folder, run_id, _ = train_in(cwd, *SMOKE)
    return cwd, folder, run_id


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real local MLflow server on a free port of 127.0.0.1, as `transferlab server
    --backend sqlite` starts it (served artifacts); its URI. Shared: tests use experiments
    of their own."""
    from transferlab.tracking.server import team_server

    root = tmp_path_factory.mktemp("server")
    with team_server(root, backend="sqlite", log=root / "server.log") as (server, _):
        yield server.url


@pytest.fixture(autouse=True)
def mlflow_tracking_uri_restored():
    """A command run in the test process sets MLflow's tracking URI, and MLflow exports it as
    MLFLOW_TRACKING_URI to every later subprocess: put it back after each test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(before)  # None unsets the variable too
    elif before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
