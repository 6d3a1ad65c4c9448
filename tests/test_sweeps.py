"""Sweeps through the real CLI: Hydra multirun, Optuna, joblib and submitit, read back from MLflow."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest

from transferlab.machine import usable_cores

BIN = Path(sys.executable).parent
# Tiny real jobs: digits at 32 px, three batches of one epoch, lite0 with packaged weights.
SMOKE = ["experiment=smoke", "callbacks.progress_bar.refresh_rate=0"]


def sweep(tmp_path: Path, *overrides: str, name: str = "sweep") -> subprocess.CompletedProcess:
    command = [
        str(BIN / "transferlab"), "train", "-m", *SMOKE,
        f"hydra.sweep.dir={tmp_path / 'multirun' / name}", *overrides,
    ]  # fmt: skip
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)


def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def tmp_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's own store, for the CLI and for mlflow.search_runs.

    (``mlflow.set_tracking_uri`` also sets MLFLOW_TRACKING_URI, which would leak into
    later tests' subprocesses; monkeypatch restores it.)
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store(tmp_path))
    mlflow.set_tracking_uri(store(tmp_path))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def parent_and_children(tmp_path: Path, experiment: str = "smoke"):
    """The one parent run of the experiment and its children (a DataFrame each)."""
    runs = mlflow.search_runs(experiment_names=[experiment])
    parents = runs[runs["tags.sweep.parent"] == "true"]
    assert len(parents) == 1, runs[["run_id", "tags.mlflow.runName"]]
    parent = parents.iloc[0]
    children = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
    )
    return parent, children


def test_grid_sweep_has_one_parent_with_a_comparison_and_a_child_per_job(tmp_path: Path) -> None:
    result = sweep(tmp_path, "finetune=linear_probe,full", "optimizer.lr=1e-3,3e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = parent_and_children(tmp_path)

    assert parent.status == "FINISHED"
    assert parent["tags.mlflow.runName"] == "sweep experiment=smoke"
    assert parent["tags.sweep.dir"] == str(tmp_path / "multirun" / "sweep")
    assert "finetune=linear_probe,full" in parent["tags.sweep.overrides"]
    assert len(children) == 4 and set(children.status) == {"FINISHED"}
    combos = set(
        zip(children["params.finetune.strategy"], children["params.optimizer.lr"], strict=True)
    )
    assert combos == {(s, lr) for s in ("linear_probe", "full") for lr in ("0.001", "0.0003")}
    # Each child is named by what varies first, floats written short.
    for name, strategy, lr in zip(
        children["tags.mlflow.runName"],
        children["params.finetune.strategy"],
        children["params.optimizer.lr"],
        strict=True,
    ):
        short_lr = {"0.001": "1e-3", "0.0003": "3e-4"}[lr]
        assert name.startswith(f"{strategy} · lr={short_lr} · lite0 · "), name
    # Params hold what describes the experiment: no per-job path, no build keys.
    assert not [c for c in children.columns if c.startswith("params.paths.")]
    assert not [c for c in children.columns if c.endswith(("._target_", "._partial_"))]
    assert "params.callbacks.model_checkpoint.dirpath" not in children.columns

    # The best child by the monitored metric is tagged, and the parent holds its value.
    best = children.loc[children["metrics.best/val/acc"].idxmax()]
    assert (children["tags.sweep.best"] == "true").sum() == 1
    assert best["tags.sweep.best"] == "true"
    assert parent["metrics.best/val/acc"] == pytest.approx(best["metrics.best/val/acc"])
    assert parent["metrics.sweep/jobs"] == 4 and parent["metrics.sweep/failed"] == 0
    # The parent's description links its best child's page.
    note = parent["tags.mlflow.note.content"]
    assert f"(#/experiments/{parent.experiment_id}/runs/{best.run_id})" in note

    client = mlflow.MlflowClient(store(tmp_path))
    names = {a.path for a in client.list_artifacts(parent.run_id)}
    assert {"comparison.csv", "comparison.md", "comparison.png"} <= names

    # Every child logged its model; the best one's is registered, with the alias champion.
    assert (children["metrics.time/log_model_s"] > 0).all()
    champion = client.get_model_version_by_alias("smoke", "champion")
    assert champion.run_id == parent["tags.sweep.best_run_id"] == best.run_id
    assert champion.tags["sweep.parent_run_id"] == parent.run_id
    assert mlflow.models.get_model_info("models:/smoke@champion").run_id == best.run_id
    assert f"as 'smoke' version {champion.version}, alias 'champion'" in result.stdout
    table = read_csv(Path(client.download_artifacts(parent.run_id, "comparison.csv")))
    assert sorted(row["run_id"] for row in table) == sorted(children.run_id)
    for row in table:
        child = children[children.run_id == row["run_id"]].iloc[0]
        assert float(row["test/acc"]) == pytest.approx(child["metrics.test/acc"])
        assert float(row["images/s"]) > 0 and float(row["wall time (s)"]) > 0
        assert int(float(row["trainable params"])) == int(child["metrics.params/trainable"])
    # linear_probe trains only the head: far fewer trainable parameters than full.
    trainable = dict(
        zip(children["params.finetune.strategy"], children["metrics.params/trainable"], strict=True)
    )
    assert trainable["linear_probe"] < trainable["full"] / 100

    # `transferlab compare` gives the same table from the sweep folder or the parent's id.
    for target in (str(tmp_path / "multirun" / "sweep"), parent.run_id):
        out = tmp_path / "compare" / target[-8:]
        shown = subprocess.run(
            [str(BIN / "transferlab"), "compare", target, "--out", str(out)],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert sum(line.startswith("| ") for line in shown.stdout.splitlines()) == 1 + 4
        assert f"(run {best.run_id})" in shown.stdout
        assert (out / "comparison.png").stat().st_size > 0
        assert len(read_csv(out / "comparison.csv")) == 4

    # --x: the swept param gets its own column and the chart plots against it.
    out = tmp_path / "compare" / "by_lr"
    shown = subprocess.run(
        [str(BIN / "transferlab"), "compare", parent.run_id, "--x", "optimizer.lr",
         "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    table = read_csv(out / "comparison.csv")
    assert {row["optimizer.lr"] for row in table} == {"0.001", "0.0003"}
    assert {row["overrides"] for row in table} == {"finetune=linear_probe", "finetune=full"}

    # The sweep folder points at its parent; compare by experiment name shows the children
    # only; an unknown target is one line.
    info = json.loads((tmp_path / "multirun" / "sweep" / "sweep_run.json").read_text())
    assert info["parent_run_id"] == parent.run_id
    by_name = subprocess.run(
        [str(BIN / "transferlab"), "compare", "smoke", "--out", str(tmp_path / "c")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert by_name.returncode == 0, by_name.stderr
    assert best.run_id[:8] in by_name.stdout and parent.run_id[:8] not in by_name.stdout
    unknown = subprocess.run(
        [str(BIN / "transferlab"), "compare", "nope"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert unknown.returncode == 1
    assert "not a sweep folder, a run id or an experiment" in unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_failing_job_is_a_failed_child_and_the_sweep_goes_on(tmp_path: Path) -> None:
    # An absurd learning rate makes the loss NaN: the divergence guard fails that job.
    result = sweep(tmp_path, "optimizer.lr=1e12,1e-3")
    assert result.returncode == 1
    assert "1 job(s) of the sweep failed" in result.stderr
    assert "Traceback" not in result.stderr
    parent, children = parent_and_children(tmp_path)
    assert parent.status == "FINISHED"
    assert parent["metrics.sweep/jobs"] == 2 and parent["metrics.sweep/failed"] == 1
    by_lr = {row["params.optimizer.lr"]: row for _, row in children.iterrows()}
    failed, finished = by_lr["1000000000000.0"], by_lr["0.001"]
    assert failed.status == "FAILED"
    assert "NaN or infinite" in failed["tags.error"]
    assert finished.status == "FINISHED" and finished["metrics.test/acc"] > 0
    assert finished["tags.sweep.best"] == "true"
    table = (tmp_path / "multirun" / "sweep" / "comparison.md").read_text()
    assert "FAILED" in table and "NaN or infinite" in table


def test_parallel_joblib_jobs_share_the_cores_and_lose_no_metrics(tmp_path: Path) -> None:
    result = sweep(
        tmp_path, "seed=0,1", "trainer.max_epochs=2",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "database is locked" not in result.stderr + result.stdout
    parent, children = parent_and_children(tmp_path)
    assert parent.status == "FINISHED" and len(children) == 2
    client = mlflow.MlflowClient(store(tmp_path))
    for _, child in children.iterrows():
        assert child.status == "FINISHED"
        assert child["tags.speed.threads"] == str(max(1, usable_cores() // 2))
        # Jobs that share the cores wait passively, unless the environment says otherwise.
        assert child["tags.speed.omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
        assert child["tags.speed.omp_wait_policy.why"]
        for name in ("val/acc", "val/loss", "train/loss_epoch", "train/acc"):
            history = client.get_metric_history(child.run_id, name)
            assert sorted(m.step for m in history) == sorted({m.step for m in history})
            assert len(history) == 2, (name, history)
        for name in ("test/acc", "best/val/acc", "time/fit_s", "perf/train_images_per_s"):
            assert math.isfinite(child[f"metrics.{name}"])


@pytest.mark.slow  # 35 s on 2 cores: `make test-slow` runs it
def test_optuna_search_is_stored_resumed_and_survives_a_failed_trial(tmp_path: Path) -> None:
    search = ["hparams_search=fmnist_optuna", "data=digits", "trainer=debug"]
    first = sweep(tmp_path, *search, "hydra.sweeper.n_trials=2", name="first")
    assert first.returncode == 0, first.stderr[-3000:]
    parent, children = parent_and_children(tmp_path, "fmnist_optuna")
    assert parent["tags.sweep.sweeper"] == "optuna" and len(children) == 2

    # The same search with a larger budget adds one trial to the stored study; this one
    # is forced to diverge, and is recorded as a failed trial without stopping the search.
    more = sweep(tmp_path, *search, "hydra.sweeper.n_trials=3", "optimizer.lr=1e12", name="again")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "Resuming study 'fmnist_optuna': 2 trials done, 1 to go." in more.stdout
    study = optuna.load_study(
        study_name="fmnist_optuna", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    )
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.FAIL]

    again, children = parent_and_children(tmp_path, "fmnist_optuna")
    assert again.run_id == parent.run_id and again.status == "FINISHED"
    # The best trial is still the first session's: its registered version stays the champion.
    client = mlflow.MlflowClient(store(tmp_path))
    (version,) = client.search_model_versions("name = 'fmnist_optuna'")
    assert version.run_id == again["tags.sweep.best_run_id"]
    assert client.get_model_version_by_alias("fmnist_optuna", "champion").version == version.version
    assert sorted(children.status) == ["FAILED", "FINISHED", "FINISHED"]
    assert again["metrics.sweep/jobs"] == 3 and again["metrics.sweep/failed"] == 1
    # Trials sample the searched keys: they differ between the two finished trials.
    finished = children[children.status == "FINISHED"]
    assert finished["params.optimizer.lr"].nunique() == 2
    assert (tmp_path / "multirun" / "again" / "comparison.png").stat().st_size > 0

    # A finished budget runs nothing more.
    done = sweep(tmp_path, *search, "hydra.sweeper.n_trials=3", name="done")
    assert done.returncode == 0 and "nothing to run" in done.stdout
    assert len(optuna.load_study(study_name="fmnist_optuna", storage=study._storage).trials) == 3


@pytest.mark.slow  # 18 s on 2 cores: `make test-slow` runs it
def test_slurm_preset_runs_end_to_end_through_submitits_local_executor(tmp_path: Path) -> None:
    result = sweep(tmp_path, "seed=0,1", "hydra/launcher=slurm_local")
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = parent_and_children(tmp_path)
    assert parent["tags.sweep.launcher"] == "LocalLauncher"
    assert len(children) == 2 and set(children.status) == {"FINISHED"}
    assert set(children["tags.speed.threads"]) == {"1"}  # the preset's cpus_per_task
    assert (tmp_path / "multirun" / "sweep" / ".submitit").is_dir()


def test_resumed_search_fails_trials_left_running(tmp_path: Path) -> None:
    from hydra_plugins.transferlab_optuna.resumable_sweeper import finished_trials

    storage = f"sqlite:///{tmp_path / 'studies' / 'optuna.db'}"
    assert finished_trials(storage, "s") == 0  # no study yet; the folder is created
    study = optuna.create_study(study_name="s", storage=storage)
    study.tell(study.ask(), 1.0)
    study.ask()  # left RUNNING, as by a killed search
    assert finished_trials(storage, "s") == 1
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]


@pytest.mark.parametrize(
    ("launcher", "cores", "expected"),
    [
        ({"n_jobs": 2}, 2, 1),
        ({"n_jobs": 2}, 8, 4),
        ({"n_jobs": -1}, 8, 1),  # joblib: as many jobs as cores
        ({"n_jobs": -2}, 8, 1),  # cores - 1 jobs
        ({"n_jobs": 1}, 8, None),
        ({"cpus_per_task": 3, "tasks_per_node": 1}, 8, 3),
        ({}, 8, None),  # the basic launcher: one job at a time
    ],
)
def test_threads_per_job_share_the_cores(launcher: dict, cores: int, expected: int | None) -> None:
    from transferlab.machine import threads_per_job

    assert threads_per_job(launcher, cores) == expected


def test_comparison_ranks_finished_rows_by_the_monitor_and_mode() -> None:
    from transferlab.reports.comparison import Comparison, markdown, short_value, varying

    def row(run_id: str, status: str, value: float) -> dict:
        return {"run_id": run_id, "overrides": f"x={run_id}", "status": status,
                "best val/loss": value, "error": ""}  # fmt: skip

    rows = [row("a", "FINISHED", 0.5), row("b", "FAILED", 0.1), row("c", "FINISHED", math.nan),
            row("d", "FINISHED", 0.3)]  # fmt: skip
    assert Comparison("t", "val/loss", "min", rows).best()["run_id"] == "d"
    assert Comparison("t", "val/loss", "max", rows).best()["run_id"] == "a"
    assert Comparison("t", "val/loss", "max", rows).failed == 1
    assert "x=d *" in markdown(Comparison("t", "val/loss", "min", rows))
    assert Comparison("t", "val/loss", "max", rows[1:2]).best() is None
    assert varying([{"a": "1", "s": "0"}, {"a": "2", "s": "0"}]) == ["a"]
    assert (
        short_value("0.0012520653814999472") == "0.001252" and short_value("resnet50") == "resnet50"
    )


def test_trend_chart_draws_one_line_per_configuration_averaged_over_seeds() -> None:
    from transferlab.reports.comparison import Comparison, chart

    def row(strategy: str, n: int, seed: int, acc: float) -> dict:
        return {"run_id": f"{strategy}{n}{seed}", "status": "FINISHED", "n": str(n),
                "overrides": f"finetune={strategy} seed={seed}", "best val/acc": acc,
                "test/acc": acc, "error": ""}  # fmt: skip

    rows = [row("full", 10, 0, 0.5), row("full", 10, 1, 0.7), row("full", 100, 0, 0.9)]
    rows += [row("linear_probe", 10, 0, 0.4), row("linear_probe", 100, 0, 0.6)]
    figure = chart(Comparison("t", "val/acc", "max", rows, x="n"))
    (ax,) = figure.axes
    lines = {line.get_label(): list(zip(*line.get_data(), strict=True)) for line in ax.get_lines()}
    assert lines == {
        "finetune=full": [(10.0, pytest.approx(0.6)), (100.0, 0.9)],
        "finetune=linear_probe": [(10.0, 0.4), (100.0, 0.6)],
    }
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "n"
