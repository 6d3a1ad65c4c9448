"""Stopping and resuming runs through the real CLI: signals, dead runs and resume=."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

BIN = Path(sys.executable).parent
TESTS = Path(__file__).resolve().parent
RUN = ["experiment=smoke", "trainer.limit_train_batches=3"]
ALLOW_FAULTS = (
    "allowed_targets=[torch.optim.*,pytorch_lightning.callbacks.*,transferlab.*,faults.*]"
)


def fault(signal_name: str, epoch: int, batch: int, marker: Path) -> list[str]:
    """Overrides that send ``signal_name`` to the run before (epoch, batch), once."""
    return [
        ALLOW_FAULTS,
        "+callbacks.fault._target_=faults.SignalOnce",
        f"+callbacks.fault.epoch={epoch}",
        f"+callbacks.fault.batch={batch}",
        f"+callbacks.fault.signal={signal_name}",
        f"+callbacks.fault.marker={marker}",
    ]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(TESTS)}


def train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "transferlab"), "train", *args],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def client_for(tmp_path: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")


def only_run(tmp_path: Path, name: str | None = None):
    client = client_for(tmp_path)
    (experiment,) = client.search_experiments(filter_string="name = 'smoke'")
    runs = client.search_runs([experiment.experiment_id])
    if name is not None:
        runs = [r for r in runs if r.data.tags["output_dir"].endswith(name)]
    (run,) = runs
    return run


def histories(client: mlflow.MlflowClient, run) -> dict[str, list[tuple[int, float]]]:
    """Every metric's (step, value) points, but timings, which differ between processes."""
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in run.data.metrics
        if not key.startswith(("time/", "perf/"))
    }


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("transferlab:")]


@pytest.mark.slow  # 42 s on 2 cores; SIGTERM and resume basics stay in the default suite
def test_a_run_killed_mid_epoch_resumes_into_the_same_run_with_exactly_the_same_results(
    tmp_path: Path,
) -> None:
    epochs = "trainer.max_epochs=4"
    killed_dir = tmp_path / "outputs" / "killed"
    # SIGKILL (nothing can run) in epoch 2 of 4, after its first batch was logged.
    killed = train(
        tmp_path, *RUN, epochs, f"hydra.run.dir={killed_dir}",
        *fault("SIGKILL", epoch=2, batch=1, marker=tmp_path / "killed.marker"),
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    run = only_run(tmp_path)
    assert run.info.status == "RUNNING"  # nothing could close it
    assert (killed_dir / "checkpoints" / "last.ckpt").is_file()

    # Resumed by run id: the dead run is marked KILLED, then continued in place.
    resumed = train(tmp_path, f"resume={run.info.run_id}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Marked 1 run(s) KILLED whose process had died: {run.info.run_id[:8]}" in (
        resumed.stdout
    )
    run = only_run(tmp_path)  # still one run: the same one
    assert run.info.status == "FINISHED" and run.data.tags["resume.count"] == "1"

    reference = train(tmp_path, *RUN, epochs, f"hydra.run.dir={tmp_path / 'outputs' / 'ref'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    client = client_for(tmp_path)
    uninterrupted = only_run(tmp_path, "ref")
    resumed_run = client.get_run(run.info.run_id)
    test_metrics = {k: v for k, v in uninterrupted.data.metrics.items() if k.startswith("test/")}
    assert test_metrics and all(
        resumed_run.data.metrics[key] == value for key, value in test_metrics.items()
    ), (resumed_run.data.metrics, test_metrics)
    # No gaps, no duplicates: every metric's history is the uninterrupted run's, point for point.
    got, expected = histories(client, resumed_run), histories(client, uninterrupted)
    assert got == expected
    assert [step for step, _ in got["train/loss_step"]] == list(range(12))


@pytest.mark.slow  # 32 s on 2 cores: `make test-slow` runs it
def test_sigterm_during_fit_ends_killed_and_a_requeued_job_resumes(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "outputs" / "run"
    stopped = train(
        tmp_path, *RUN, "trainer.max_epochs=2", f"hydra.run.dir={folder}",
        *fault("SIGTERM", epoch=1, batch=1, marker=tmp_path / "term.marker"),
    )  # fmt: skip
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    (line,) = error_lines(stopped.stderr)
    assert "stopped by SIGTERM" in line and f"transferlab train resume={folder}" in line
    assert "Traceback" not in stopped.stderr
    run = only_run(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["error"] == "stopped by SIGTERM"

    # SLURM requeues a pre-empted job with the same command: it continues the same run.
    requeued = subprocess.run(
        [str(BIN / "transferlab"), "train", *RUN, "trainer.max_epochs=2",
         f"hydra.run.dir={folder}",
         *fault("SIGTERM", epoch=1, batch=1, marker=tmp_path / "term.marker")],
        cwd=tmp_path, env={**env(), "SLURM_RESTART_COUNT": "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"SLURM restarted this job: continuing run {run.info.run_id}" in requeued.stdout
    run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
    assert run.data.tags["resume.count"] == "1"
    # Finished: nothing more to resume.
    again = train(tmp_path, f"resume={folder}")
    assert again.returncode == 1 and error_lines(again.stderr) == [
        f"transferlab: error: run {run.info.run_id} finished: there is nothing to resume"
    ]


def test_sigterm_before_training_ends_the_run_killed(tmp_path: Path) -> None:
    folder = tmp_path / "outputs" / "run"
    process = subprocess.Popen(
        [str(BIN / "transferlab"), "train", *RUN, f"hydra.run.dir={folder}"],
        cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (folder / "run.json").exists():  # the MLflow run is open; nothing is built yet
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert line.startswith("transferlab: stopped by SIGTERM") and "Traceback" not in stderr
    assert only_run(tmp_path).info.status == "KILLED"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["optimizer.lr=0.5"], "'optimizer.lr=0.5' cannot change"),
        (["-m"], "leave out -m"),
    ],
)
def test_resume_refuses_a_changed_config(tmp_path: Path, extra: list[str], message: str) -> None:
    folder = tmp_path / "outputs" / "run"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("- experiment=smoke\n")
    (folder / "run.json").write_text('{"run_id": "0123456789abcdef0123456789abcdef"}\n')
    refused = train(tmp_path, f"resume={folder}", *extra)
    assert refused.returncode == 1
    (line,) = error_lines(refused.stderr)
    assert message in line and "Traceback" not in refused.stderr


def test_resume_of_an_unknown_target_is_one_line(tmp_path: Path) -> None:
    for target, message in (
        ("nowhere", "not a run folder, nor a 32-character MLflow run id"),
        ("0" * 32, "no run store"),
    ):
        refused = train(tmp_path, f"resume={target}")
        assert refused.returncode == 1
        (line,) = error_lines(refused.stderr)
        assert message in line


def test_sigterm_in_a_sweep_ends_the_job_and_its_parent_killed(tmp_path: Path) -> None:
    stopped = train(
        tmp_path, "-m", *RUN, "trainer.max_epochs=2", "seed=0,1",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        *fault("SIGTERM", epoch=1, batch=0, marker=tmp_path / "term.marker"),
    )  # fmt: skip
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    client = client_for(tmp_path)
    (experiment,) = client.search_experiments(filter_string="name = 'smoke'")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.parent") == "true"]
    children = [r for r in runs if r not in parents]
    # The sweep stops at the signal: the second job never starts.
    assert [r.info.status for r in parents] == ["KILLED"]
    assert [r.info.status for r in children] == ["KILLED"]
