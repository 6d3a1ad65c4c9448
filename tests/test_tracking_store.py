"""Where a run is stored: a store that cannot work fails at once in one line, and a sqlite
store keeps its artifacts next to its database, wherever the command runs from."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from transferlab.errors import UserError
from transferlab.tracking.store import artifact_root, check_store, sqlite_path

BIN = Path(sys.executable).parent
CHEAP = ["experiment=smoke", "trainer.max_epochs=1", "trainer.limit_train_batches=4"]


def train(cwd: Path, uri: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run(
        [str(BIN / "transferlab"), "train", *CHEAP, *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:////proc/x.db", "cannot create files in /proc"),
        ("http://127.0.0.1:9", "cannot reach the MLflow tracking server http://127.0.0.1:9"),
    ],
)
def test_a_store_that_cannot_work_fails_at_once_in_one_line(
    tmp_path: Path, uri: str, expected: str
) -> None:
    started = time.monotonic()
    result = train(tmp_path, uri, f"hydra.run.dir={tmp_path / 'out'}")
    seconds = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("transferlab: error: ") and expected in line, line
    assert "MLFLOW_TRACKING_URI" in line  # what to fix
    assert seconds < 30, seconds  # 7 s on 2 busy cores; MLflow alone retried for minutes


def test_artifacts_stay_next_to_a_sqlite_store_elsewhere(tmp_path: Path) -> None:
    """Run from a folder (a repository, say) with the store elsewhere: nothing lands here."""
    here, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    here.mkdir()
    uri = f"sqlite:///{elsewhere / 'mlflow.db'}"
    result = train(here, uri, f"hydra.run.dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(here.iterdir()) == []

    run_id = re.search(r"MLflow run: (\w+)", result.stdout).group(1)
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (elsewhere / "artifacts" / "smoke").as_uri()
    stored = elsewhere / "artifacts" / "smoke" / run_id / "artifacts"
    assert {p.name for p in stored.iterdir()} >= {"checkpoints", "config", "test"}
    assert list((stored / "checkpoints").glob("*.ckpt"))


def test_sqlite_paths_and_their_artifact_roots(tmp_path: Path) -> None:
    absolute = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"  # sqlite:////tmp/...
    assert sqlite_path(absolute) == tmp_path / "db" / "mlflow.db"
    assert artifact_root(absolute) == tmp_path / "db" / "artifacts"
    assert sqlite_path("sqlite:///runs.db?mode=rwc") == Path("runs.db").resolve()
    for other in ("sqlite://", "sqlite:///:memory:", "http://host:5000", "postgresql://h/db"):
        assert sqlite_path(other) is None and artifact_root(other) is None


def test_a_sqlite_store_folder_is_created_and_checked(tmp_path: Path) -> None:
    check_store(f"sqlite:///{tmp_path / 'new' / 'deeper' / 'mlflow.db'}")
    assert (tmp_path / "new" / "deeper").is_dir()
    assert list((tmp_path / "new" / "deeper").iterdir()) == []  # the probe is gone
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(UserError, match="cannot create the folder"):
        check_store(f"sqlite:///{tmp_path / 'taken' / 'mlflow.db'}")
    (tmp_path / "folder.db").mkdir()
    with pytest.raises(UserError, match="cannot write"):
        check_store(f"sqlite:///{tmp_path / 'folder.db'}")
