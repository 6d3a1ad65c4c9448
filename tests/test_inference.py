"""Using a trained run: `transferlab predict` and `transferlab export`, through the real CLI."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BIN = Path(sys.executable).parent
SMOKE = ["experiment=smoke", "trainer.max_epochs=1", "trainer.limit_train_batches=4"]


def transferlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [str(BIN / "transferlab"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a user error prints, checked to be the whole of stderr."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("transferlab: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(working folder, run folder, MLflow run id) of one cheap real training run."""
    cwd = tmp_path_factory.mktemp("inference")
    folder = cwd / "outputs" / "run"
    result = transferlab("train", *SMOKE, f"hydra.run.dir={folder}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = re.search(r"MLflow run: (\w+)", result.stdout).group(1)
    return cwd, folder, run_id


def digit_images(folder: Path, count: int) -> list[Path]:
    """``count`` digits as 8x8 grayscale PNGs (as the digits source scales them), plus one
    corrupt ``.png``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        path = folder / f"digit{i}.png"
        Image.fromarray((digits.images[i] * 255 / 16).round().astype(np.uint8)).save(path)
        paths.append(path)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return paths


def test_predict_folder_skips_corrupt_file(trained, tmp_path: Path) -> None:
    cwd, _, run_id = trained
    good = digit_images(tmp_path / "images", 5)
    out = tmp_path / "predictions.csv"
    result = transferlab(
        "predict", f"run={run_id}", f"images={tmp_path / 'images'}", f"out={out}", "top_k=3",
        cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 unreadable file(s)" in result.stdout
    assert "corrupt.png" in result.stderr
    with out.open() as stream:
        rows = list(csv.DictReader(stream))
    assert [row["file"] for row in rows] == [str(p) for p in good]
    names = {str(d) for d in range(10)}
    for row in rows:
        probs = [float(row[f"prob_{k}"]) for k in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert {row[f"class_{k}"] for k in (1, 2, 3)} <= names
    assert not list(tmp_path.glob(".predictions.csv.*"))  # no temporary file left


def test_predict_empty_folder_is_one_line(trained, tmp_path: Path) -> None:
    cwd, folder, _ = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    out = tmp_path / "predictions.csv"
    result = transferlab(
        "predict", f"run={folder}", f"images={tmp_path / 'empty'}", f"out={out}", cwd=cwd
    )
    assert "has no images" in error_line(result)
    assert not out.exists()


def test_checkpoint_of_another_class_count_is_one_line(trained, tmp_path: Path) -> None:
    _, folder, _ = trained
    best = next((folder / "checkpoints").glob("best-*.ckpt"))
    state = torch.load(best, map_location="cpu", weights_only=True)
    head = sorted(k for k in state["state_dict"] if k.startswith("network.head."))
    for key in head:  # the head of a 3-class run
        state["state_dict"][key] = state["state_dict"][key][:3].clone()
    state["hyper_parameters"]["class_names"] = ["a", "b", "c"]
    state["hyper_parameters"]["num_classes"] = 3
    other = folder / "checkpoints" / "other-run.ckpt"
    torch.save(state, other)
    try:
        image = digit_images(tmp_path / "images", 1)[0]
        result = transferlab("predict", f"run={other}", f"images={image}", cwd=tmp_path)
    finally:
        other.unlink()
    line = error_line(result)
    assert "does not fit" in line and "10 classes" in line and "is 3x" in line


def test_export_onnx_matches_pytorch(trained, tmp_path: Path) -> None:
    import onnxruntime

    from transferlab.inference import load_trained

    cwd, folder, _ = trained
    out = tmp_path / "model.onnx"
    result = transferlab("export", f"run={folder}", "format=onnx", f"out={out}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = float(re.search(r"max abs difference (\S+)", result.stdout).group(1))
    assert printed <= 1e-4

    model = load_trained(folder)
    saved = torch.load(model.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    for key, value in model.network.state_dict().items():  # the trained weights, not new ones
        assert torch.equal(value, saved[f"network.{key}"]), key
    batch = torch.randn(7, *model.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.network(batch).numpy()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    assert got.shape == (7, 10)  # a batch size other than the exported one
    assert np.abs(got - expected).max() <= 1e-4


def test_export_unknown_format_is_one_line(trained) -> None:
    cwd, folder, _ = trained
    result = transferlab("export", f"run={folder}", "format=tflite", cwd=cwd)
    assert "format=tflite is not supported" in error_line(result)
    assert not (cwd / "model.tflite").exists()
