"""`transferlab eval` and the corruption suite, through the real CLI and a sqlite MLflow store."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from clitools import SMOKE, run_id_of, transferlab
from PIL import Image

from transferlab.cli import main

ROOT = Path(__file__).resolve().parents[1]

# Two corruptions at two severities on 48 test images: every part of the suite, cheaply.
SMALL_SUITE = [
    "shift=corruptions",
    "shift.corruptions=[gaussian_noise,contrast]",
    "shift.severities=[1,5]",
    "shift.limit=48",
]


def client_at(cwd: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def run_count(cwd: Path) -> int:
    client = client_at(cwd)
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


@pytest.fixture(scope="module")
def place(trained_run, tmp_path_factory) -> tuple[Path, Path, str]:
    """A copy of the shared trained run (working folder with its store, run folder, id)."""
    cwd, folder, run_id = trained_run
    copy = tmp_path_factory.mktemp("evaluate") / "work"
    shutil.copytree(cwd, copy)
    return copy, copy / folder.relative_to(cwd), run_id


def test_eval_on_its_own_data_repeats_the_test_into_a_nested_run(place) -> None:
    cwd, _, run_id = place
    client = client_at(cwd)
    before = client.get_run(run_id).data.metrics
    result = transferlab("eval", f"run={run_id}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = client.get_run(run_id_of(result.stdout))
    assert evaluation.info.status == "FINISHED"
    assert evaluation.data.tags["evaluates"] == run_id
    assert evaluation.data.tags["mlflow.parentRunId"] == run_id  # nested under it in the UI
    for name in ("test/acc", "test/f1", "test/loss"):  # the same weights, data and precision
        assert evaluation.data.metrics[name] == pytest.approx(before[name], abs=1e-6), name
    assert client.get_run(run_id).data.metrics == before  # the trained run is untouched
    artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id, "test")}
    assert "test/confusion_matrix.png" in artifacts


def test_eval_at_another_image_size_and_under_corruptions(place) -> None:
    cwd, folder, _ = place
    result = transferlab("eval", f"run={folder}", "data.image_size=40", *SMALL_SUITE, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    client = client_at(cwd)
    run = client.get_run(run_id_of(result.stdout))
    assert run.data.params["data.image_size"] == "40"
    assert run.data.params["shift.limit"] == "48"
    metrics = run.data.metrics
    for corruption in ("gaussian_noise", "contrast"):
        history = client.get_metric_history(run.info.run_id, f"shift/{corruption}/acc")
        assert sorted(m.step for m in history) == [1, 5]  # charted against severity
    values = [
        m.value
        for c in ("gaussian_noise", "contrast")
        for m in client.get_metric_history(run.info.run_id, f"shift/{c}/acc")
    ]
    assert metrics["shift/mean/acc"] == pytest.approx(np.mean(values))
    # The printed table is the logged one, and the CSV has the clean row and every pass.
    table = client.download_artifacts(run.info.run_id, "shift/corruptions.md")
    assert Path(table).read_text().splitlines()[0] in result.stdout
    csv_rows = Path(client.download_artifacts(run.info.run_id, "shift/corruptions.csv"))
    lines = csv_rows.read_text().splitlines()
    assert lines[0].startswith("corruption,severity,") and lines[1].startswith("clean,0,")
    assert len(lines) == 2 + 4
    clean = float(lines[1].split(",")[lines[0].split(",").index("acc")])
    assert metrics["shift/relative_drop/acc"] == pytest.approx(  # from 7-digit logged values
        1 - metrics["shift/mean/acc"] / clean, abs=1e-5
    )
    assert {a.path for a in client.list_artifacts(run.info.run_id, "shift")} >= {
        "shift/corruptions.png"
    }


def write_folder(root: Path, classes: int, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["run=0123456789abcdef0123456789abcdef"], "0123456789abcdef0123456789abcdef"),
        (["shift=corruptions", "shift.corruptions=[fog_of_war]"], "fog_of_war"),
        (["shift=corruptions", "shift.severities=[6]"], "severit"),
        (["data=no_such_data"], "unknown data=no_such_data"),
        (["data=image_folder", "data.root={empty}"], "{empty}"),
        (["data=image_folder", "data.root={three}", "data.test_fraction=0.4"], "has 3 classes"),
        (["store=x"], "unknown argument 'store=x'"),
    ],
    ids=["unknown-run", "corruption", "severity", "data-option", "no-images", "classes", "arg"],
)
def test_bad_eval_input_is_one_line_and_records_nothing(
    place, tmp_path: Path, arguments: list[str], expected: str, monkeypatch, capsys
) -> None:
    cwd, folder, _ = place
    (tmp_path / "empty").mkdir()
    three = write_folder(tmp_path / "three", 3)
    paths = {"empty": str(tmp_path / "empty"), "three": str(three)}
    arguments = [a.format(**paths) for a in arguments]
    if not any(a.startswith("run=") for a in arguments):
        arguments.insert(0, f"run={folder}")
    runs = run_count(cwd)
    monkeypatch.chdir(cwd)
    assert main(["eval", *arguments]) == 1  # the CLI's own entry point, in this process
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transferlab: error: "), lines
    assert expected.format(**paths) in lines[0]
    assert run_count(cwd) == runs  # no evaluation run was started


@pytest.mark.slow  # 30 s on 2 cores: `make test-slow` runs it
def test_train_with_the_suite_compares_clean_and_shifted_side_by_side(tmp_path: Path) -> None:
    result = transferlab(
        "train", *SMOKE, *SMALL_SUITE, "tracking.experiment_name=shifted", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shift/mean/acc" in result.stdout and "| contrast |" in result.stdout
    run_id = run_id_of(result.stdout)
    assert "shift/relative_drop/acc" in client_at(tmp_path).get_run(run_id).data.metrics
    evaluated = transferlab("eval", f"run={run_id}", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    table = transferlab("compare", "shifted", "--out", str(tmp_path / "compare"), cwd=tmp_path)
    assert table.returncode == 0, table.stderr[-3000:]
    assert "shift/mean/acc" in table.stdout and "shift/relative_drop/acc" in table.stdout
    rows = (tmp_path / "compare" / "comparison.csv").read_text().splitlines()
    assert len(rows) == 2  # the training run; its evaluation is not a row of its own
    figure = tmp_path / "robustness.png"
    drawn = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "robustness_figure.py"), "--experiment",
         "shifted", "--out", str(figure)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert figure.stat().st_size > 10_000


def test_a_run_whose_folder_is_gone_is_loaded_from_its_mlflow_artifacts(
    place, tmp_path: Path, monkeypatch, capsys
) -> None:
    cwd, _, run_id = place
    folder = Path(client_at(cwd).get_run(run_id).data.tags["output_dir"])  # the shared run's
    moved = tmp_path / "elsewhere"
    shutil.move(folder, moved)  # another machine, or a cleaned disk (put back below)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(cwd)
    try:
        assert main(["eval", f"run={run_id}"]) == 0
    finally:
        shutil.move(moved, folder)
    out = capsys.readouterr().out
    assert "Downloaded run" in out
    downloaded = tmp_path / "cache" / "transferlab" / "runs" / run_id
    assert (downloaded / ".hydra" / "config.yaml").is_file()
    assert len(list((downloaded / "checkpoints").glob("best-*.ckpt"))) == 1
    client = client_at(cwd)
    evaluation = client.get_run(run_id_of(out))
    trained = client.get_run(run_id).data.metrics
    assert evaluation.data.metrics["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
