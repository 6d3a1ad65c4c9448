"""`transferlab reproduce`: a finished run trained again from its record, results compared."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from transferlab.errors import UserError
from transferlab.reproduce import report

BIN = Path(sys.executable).parent


def transferlab(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "transferlab"), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow  # 25 s on 2 cores: `make test-slow` runs it
def test_a_reproduced_cpu_run_gives_identical_results(tmp_path: Path) -> None:
    folder = tmp_path / "outputs" / "original"
    trained = transferlab(
        tmp_path, "train", "experiment=smoke", "trainer.max_epochs=1", f"hydra.run.dir={folder}"
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    again = transferlab(tmp_path, "reproduce", str(folder))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "The results are identical." in again.stdout

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("smoke").experiment_id],
        order_by=["attributes.start_time ASC"],
    )
    original, reproduced = runs
    assert reproduced.data.tags["reproduces"] == original.info.run_id
    assert reproduced.data.metrics["test/acc"] == original.data.metrics["test/acc"]
    for line in ("test/acc", "best/val/acc"):
        assert any(row.split()[0] == line and row.endswith("identical")
                   for row in again.stdout.splitlines() if row.strip())  # fmt: skip

    # A result that differs is reported, and is an error.
    client.log_metric(original.info.run_id, "test/acc", 0.5, step=10**6)  # the latest value
    with pytest.raises(UserError, match="differ from run"):
        report(client.get_run(original.info.run_id), reproduced)


def test_reproducing_an_unknown_run_is_one_line(tmp_path: Path) -> None:
    refused = transferlab(tmp_path, "reproduce", "0" * 32)
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("transferlab: error: no run store")
    assert len(refused.stderr.strip().splitlines()) == 1
