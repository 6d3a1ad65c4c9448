"""Using a trained run: `transferlab predict` and `transferlab export`, through the real CLI."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import error_line, transferlab
from PIL import Image


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


def test_predict_folder_skips_corrupt_file(trained_run, tmp_path: Path) -> None:
    cwd, _, run_id = trained_run
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


def test_predict_empty_folder_is_one_line(trained_run, tmp_path: Path) -> None:
    cwd, folder, _ = trained_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    out = tmp_path / "predictions.csv"
    result = transferlab(
        "predict", f"run={folder}", f"images={tmp_path / 'empty'}", f"out={out}", cwd=cwd
    )
    assert "has no images" in error_line(result)
    assert not out.exists()


def test_checkpoint_of_another_class_count_is_one_line(trained_run, tmp_path: Path) -> None:
    _, folder, _ = trained_run
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


def test_export_onnx_matches_pytorch(trained_run, tmp_path: Path) -> None:
    import onnxruntime

    from transferlab.inference import load_trained

    cwd, folder, _ = trained_run
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


def test_export_unknown_format_is_one_line(trained_run) -> None:
    cwd, folder, _ = trained_run
    result = transferlab("export", f"run={folder}", "format=tflite", cwd=cwd)
    assert "format=tflite is not supported" in error_line(result)
    assert not (cwd / "model.tflite").exists()


def test_commands_serve_the_tasks_that_support_them() -> None:
    """predict, explain, export and the MLflow Model follow the task's hooks: a new task
    is supported by its own file, and a command names the tasks it serves."""
    from transferlab.errors import UserError
    from transferlab.tasks import build_task
    from transferlab.tasks.base import TASKS, Task, register_task, require_support, supporting

    assert supporting("predict") == ["classification", "detection", "segmentation"]
    assert supporting("explain_titles") == ["classification", "detection", "segmentation"]
    assert supporting("serving_model") == ["classification", "detection", "segmentation"]
    assert supporting("exportable") == ["classification", "segmentation"]
    with pytest.raises(UserError, match="export supports task=classification and "
                       "task=segmentation runs; here is a task=detection run"):  # fmt: skip
        require_support(build_task({"name": "detection"}), "exportable", "export", "here")
    try:

        @register_task("counting")
        class Counting(Task):
            def predict(self, model, request) -> None:
                pass

        assert "counting" in supporting("predict") and "counting" not in supporting("exportable")
    finally:
        TASKS.pop("counting", None)
