"""The commands a user runs, through the real CLI, Hydra and an MLflow sqlite store."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from clitools import composed, start_dashboard

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]

SPEED_SETTINGS = (
    "threads", "omp_wait_policy", "memory_format", "eval_precision",
    "num_workers", "pin_memory", "eval_batch_size",
)  # fmt: skip
# A tiny real run: digits at 32 px, two short epochs, lite0 with its packaged weights.
SMOKE = ["experiment=smoke", "trainer.max_epochs=2", "trainer.limit_train_batches=4"]


def transferlab(*args: str, cwd: Path, module: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *args] if module else [str(BIN / "transferlab"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)


def train(tmp_path: Path, *overrides: str, name: str = "run") -> subprocess.CompletedProcess:
    return transferlab(
        "train", *SMOKE, f"hydra.run.dir={tmp_path / 'outputs' / name}", *overrides, cwd=tmp_path
    )


def parse_test_metrics(stdout: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"^\s+(test/\S+)\s+([0-9.]+)$", stdout, re.M)}


def client_for(tmp_path: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")


def test_help_lists_commands_quickly(tmp_path: Path) -> None:
    result = transferlab("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "train" in result.stdout and "ui" in result.stdout


def test_train_help_lists_groups_and_options(tmp_path: Path) -> None:
    result = transferlab("train", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    groups = dict(
        line.split(": ", 1)
        for line in result.stdout.splitlines()
        if ": " in line and "=" not in line
    )
    assert {"full", "linear_probe"} <= set(groups["finetune"].split(", "))
    assert groups["optimizer"] == "adamw, sgd"
    assert "efficientnet_lite0" in result.stdout and "resnet18_scratch" in result.stdout


def test_python_module_entry_point_matches_console_script(tmp_path: Path) -> None:
    args = ("model=resnet50", "optimizer.lr=3e-4", "seed=7", "--cfg", "job")
    via_cli = transferlab("train", *args, cwd=tmp_path)
    via_module = transferlab(*args, cwd=tmp_path, module="transferlab.train")
    assert via_cli.returncode == 0 and via_module.returncode == 0, via_cli.stderr
    assert via_cli.stdout == via_module.stdout
    assert "name: resnet50" in via_cli.stdout and "lr: 0.0003" in via_cli.stdout
    assert "seed: 7" in via_cli.stdout


def test_train_records_a_finished_mlflow_run(tmp_path: Path) -> None:
    result = train(tmp_path, "data.samples_per_class=20", "tracking.experiment_name=e2e")
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = re.search(r"MLflow run: (\w+)", result.stdout).group(1)
    assert "transferlab ui" in result.stdout
    printed = parse_test_metrics(result.stdout)
    assert {"test/acc", "test/f1", "test/top5"} <= set(printed)

    client = client_for(tmp_path)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "e2e"
    params = run.data.params
    assert params["model.name"] == "tf_efficientnet_lite0"
    assert params["data.source"] == "digits"
    assert params["data.samples_per_class"] == "20"
    assert params["finetune.strategy"] == "full"
    assert params["seed"] == "0"
    assert int(params["model.params_total"]) > 3_000_000
    tags = run.data.tags
    for key in ("git.commit", "git.dirty", "command", "overrides", "data.fingerprint"):
        assert tags.get(key), key
    assert "data.samples_per_class=20" in tags["overrides"]
    assert tags["version.torch"] and tags["version.mlflow"]
    assert tags["mlflow.runName"].startswith("lite0 · full")
    # Every speed setting chosen for the machine is printed and tagged with its reason.
    assert "Speed settings on" in result.stdout and tags["machine.cpu"]
    for name in SPEED_SETTINGS:
        assert tags[f"speed.{name}"] and tags[f"speed.{name}.why"], name
    assert tags["speed.memory_format"] in ("channels_last", "contiguous")
    assert tags["speed.eval_precision"] in ("bf16", "32")

    metrics = run.data.metrics
    assert metrics["test/acc"] == pytest.approx(printed["test/acc"], abs=1e-4)
    val_history = client.get_metric_history(run_id, "val/acc")
    assert [point.step for point in val_history] == [0, 1]  # charted against the epoch
    assert "train/loss_epoch" in metrics
    # One learning rate per distinct rate, against the epoch; float32 noise rounded off.
    assert sorted(key for key in metrics if key.startswith("lr")) == ["lr/backbone", "lr/head"]
    assert [p.step for p in client.get_metric_history(run_id, "lr/head")] == [0, 1]
    assert all(value == float(f"{value:.7g}") for value in metrics.values())
    # The description (MLflow's run page and table) holds the key result.
    note = tags["mlflow.note.content"]
    assert (
        note.startswith(f"test/acc {metrics['test/acc']:.4f} · test/f1 ") and "best val/acc" in note
    )
    assert metrics["params/trainable"] == metrics["params/total"] > 3_000_000  # full

    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config", "test", "checkpoints"} <= artifacts
    # Also at the root, where MLflow's Compare view shows runs' figures side by side.
    assert {"confusion_matrix.png", "learning_curves.png"} <= artifacts
    config_files = {Path(a.path).name for a in client.list_artifacts(run_id, "config")}
    assert {"config.yaml", "overrides.yaml"} <= config_files
    test_files = {Path(a.path).name for a in client.list_artifacts(run_id, "test")}
    assert {"confusion_matrix.png", "per_class_metrics.csv"} <= test_files
    assert {"confused_pairs.png", "confused_pairs.csv"} <= test_files
    checkpoints = client.list_artifacts(run_id, "checkpoints")
    assert len(checkpoints) == 1 and checkpoints[0].path.endswith(".ckpt")
    local = Path(client.download_artifacts(run_id, "test/per_class_metrics.csv", str(tmp_path)))
    rows = local.read_text().splitlines()
    assert rows[0] == "class,support,precision,recall,f1" and len(rows) == 11

    assert tags["finetune"] == "full"  # the finetune= option chosen: the run's label

    # An experiment's runs compare like a sweep's, ranked by the runs' own monitor.
    report = subprocess.run(
        [str(BIN / "transferlab"), "compare", "e2e", "--out", str(tmp_path / "cmp")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    rows = [line for line in report.stdout.splitlines() if line.startswith("|")]
    (row,) = [line for line in rows if run_id[:8] in line]
    assert f"{printed['test/acc']:.4f}" in row and "best val/acc" in report.stdout


@pytest.mark.slow  # 30-140 s on 2 cores: `make test-slow` runs it
def test_a_run_started_on_busy_cores_waits_passively(tmp_path: Path) -> None:
    from test_machine import spinners, stop

    from transferlab.machine import usable_cores

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    load = spinners(usable_cores(), seconds=120)
    try:
        time.sleep(1.0)
        result = subprocess.run(
            [str(BIN / "transferlab"), "train", *SMOKE, "trainer.max_epochs=1",
             f"hydra.run.dir={tmp_path / 'outputs'}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        stop(load)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = re.search(r"MLflow run: (\w+)", result.stdout).group(1)
    tags = client_for(tmp_path).get_run(run_id).data.tags
    assert tags["speed.omp_wait_policy"] == "PASSIVE"
    assert tags["speed.omp_wait_policy.why"].startswith("other processes keep")


@pytest.mark.slow  # 30-140 s on 2 cores: `make test-slow` runs it
def test_long_config_values_are_not_cut(tmp_path: Path) -> None:
    long_name = "x" * 400
    result = train(tmp_path, f"tracking.run_name={long_name[:200]}", f"+note={long_name}")
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = re.search(r"MLflow run: (\w+)", result.stdout).group(1)
    assert client_for(tmp_path).get_run(run_id).data.params["note"] == long_name


@pytest.mark.slow  # 30-140 s on 2 cores: `make test-slow` runs it
def test_same_seed_same_metrics_other_seed_differs(tmp_path: Path) -> None:
    runs = [
        train(tmp_path, "tracking=none", f"seed={seed}", name=f"s{i}")
        for i, seed in enumerate((0, 0, 1))
    ]
    for result in runs:
        assert result.returncode == 0, result.stderr[-3000:]
    first, again, other = (parse_test_metrics(r.stdout) for r in runs)
    assert first and first == again
    assert first != other


def test_crash_ends_the_run_failed(tmp_path: Path) -> None:
    result = train(tmp_path, "optimizer.lr=-1")
    assert result.returncode != 0
    client = client_for(tmp_path)
    (experiment,) = [e for e in client.search_experiments() if e.name == "smoke"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert "learning rate" in run.data.tags["error"].lower()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.name=resnet5O"], "did you mean"),
        (["data=image_folder", "data.root=/no/such/folder"], "/no/such/folder"),
        (["model=no_such_model"], "Available options in 'model'"),
        (["optimizer.lrr=0.1"], "Did you mean: 'lr'"),
        (["finetune.bn=sometimes"], "finetune.bn"),
        (["trainer.memory_format=nhwc"], "trainer.memory_format='nhwc' is not one of"),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    tmp_path: Path, overrides: list[str], expected: str
) -> None:
    result = train(tmp_path, "tracking=none", *overrides)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_ui_without_a_store_says_what_to_do(tmp_path: Path) -> None:
    result = transferlab("ui", cwd=tmp_path)
    assert result.returncode == 1
    assert "run `transferlab train` here first" in result.stderr


def test_ui_serves_the_dashboard_for_the_local_store(tmp_path: Path) -> None:
    store = tmp_path / "mlruns"
    store.mkdir()
    mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}").search_experiments()
    server, link = start_dashboard(tmp_path)
    try:
        assert link.endswith("/")  # no runs yet: the dashboard's root
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_the_default_run_keeps_its_accuracy(tmp_path: Path) -> None:
    """`transferlab train` with no override: the README's task and accuracy (about 0.86)."""
    result = transferlab("train", f"hydra.run.dir={tmp_path / 'outputs'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = parse_test_metrics(result.stdout)
    assert metrics["test/acc"] >= 0.85, metrics
    run_id = re.search(r"MLflow run: (\w+)", result.stdout).group(1)
    tags = client_for(tmp_path).get_run(run_id).data.tags
    assert tags["speed.omp_wait_policy"] in (
        "default",
        "PASSIVE",
        os.environ.get("OMP_WAIT_POLICY"),
    )


@pytest.mark.slow  # 30-140 s on 2 cores: `make test-slow` runs it
def test_an_installed_wheel_runs_from_an_empty_folder(tmp_path: Path) -> None:
    """`pip install .` (not editable): the configs travel inside the package."""
    import sysconfig

    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(ROOT), "-w", str(wheels)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         *map(str, wheels.glob("transferlab-*.whl"))],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    assert (site / "transferlab" / "conf" / "train.yaml").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    # The installed package first; its dependencies from this environment.
    path = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])
    env = {**os.environ, "PYTHONPATH": path}
    code = "import transferlab.cli as c, sys; print(c.__file__, file=sys.stderr); c.main()"
    result = subprocess.run(
        [sys.executable, "-c", code, "train", *SMOKE, "trainer.max_epochs=1"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(site) in result.stderr.splitlines()[0]  # not the source checkout
    assert "MLflow run:" in result.stdout and (empty / "mlruns" / "mlflow.db").is_file()


def test_top_confusions_are_the_largest_off_diagonal_counts() -> None:
    import numpy as np

    from transferlab.reports.confusion import top_confusions

    confusion = np.array([[50, 3, 9], [1, 40, 0], [9, 2, 30]])
    # Ties broken by (true, predicted); the diagonal (correct) never counts.
    assert top_confusions(confusion, k=3) == [(0, 2, 9), (2, 0, 9), (0, 1, 3)]
    assert top_confusions(np.eye(3) * 5) == []


def test_a_run_started_from_python_is_usable_like_a_cli_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``transferlab.train.run(cfg)`` without Hydra's CLI (no ``.hydra`` folder written by
    Hydra) still saves its config, logs its MLflow Model and serves ``predict``."""
    from omegaconf import open_dict

    from transferlab.inference import load_trained
    from transferlab.train import run

    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cfg = composed(tmp_path, *SMOKE, "trainer.max_epochs=1")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
    run(cfg)
    (found,) = mlflow.MlflowClient(store).search_runs(["1"])
    assert found.data.metrics["time/log_model_s"] > 0
    assert (tmp_path / "out" / ".hydra" / "config.yaml").is_file()
    assert len(load_trained(tmp_path / "out").class_names) == 10  # the digits
