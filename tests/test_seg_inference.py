"""A trained segmentation run used: `transferlab predict` (a mask PNG per image at its own
size and a CSV of class shares), `transferlab export` (ONNX) and its MLflow Model, through
the real CLI and a real sqlite store. One tiny real run, shared by the module."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from clitools import train_in, transferlab
from PIL import Image
from test_mlflow_model import load_offline

TINY_SEGMENTATION = [
    "task=segmentation", "data.image_size=64", "data.train_images=16", "data.batch_size=8",
    "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
]  # fmt: skip
SIZES = {"scene.png": (64, 64), "wide.jpg": (120, 90), "sub/gray.png": (37, 50)}  # (W, H)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(working folder, run folder, MLflow run id) of one tiny real segmentation run."""
    cwd = tmp_path_factory.mktemp("segmentation")
    folder, run_id, result = train_in(cwd, *TINY_SEGMENTATION)
    assert f"MLflow model: runs:/{run_id}/model" in result.stdout
    return cwd, folder, run_id


@pytest.fixture(scope="module")
def seg_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of images: one at the network's input size (64 x 64, so its mask is the
    argmax itself), a wide JPEG, a grayscale PNG in a sub-folder, and a corrupt file."""
    folder = tmp_path_factory.mktemp("seg_images")
    rng = np.random.default_rng(0)
    for name, (width, height) in SIZES.items():
        shape = (height, width) if "gray" in name else (height, width, 3)
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


@pytest.fixture(scope="module")
def predicted(seg_run, seg_images, tmp_path_factory: pytest.TempPathFactory):
    """``transferlab predict`` of the run on ``seg_images``: (its output folder, the result)."""
    cwd, folder, _ = seg_run
    out = tmp_path_factory.mktemp("predicted") / "masks"
    result = transferlab("predict", f"run={folder}", f"images={seg_images}", f"out={out}", cwd=cwd)
    return out, result


@pytest.fixture(scope="module")
def trained(seg_run):
    from transferlab.inference import load_trained

    cwd, _, run_id = seg_run
    return load_trained(run_id, cwd / "mlruns")


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open() as stream:
        return list(csv.DictReader(stream))


def test_predict_writes_a_mask_per_image_at_its_size(predicted, trained, seg_images) -> None:
    out, result = predicted
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Segmented 3 image(s)" in result.stdout
    assert "skipped 1 unreadable file(s)" in result.stdout and "corrupt.png" in result.stderr
    names = {"scene_mask.png", "wide_mask.png", "gray_mask.png", "predictions.csv"}
    assert {p.name for p in out.iterdir()} == names
    assert [p.name for p in out.parent.iterdir()] == ["masks"]  # no temporary folder left

    classes = list(trained.class_names)
    rows = read_rows(out / "predictions.csv")
    assert list(rows[0]) == ["file", "mask", *(f"share_{name}" for name in classes)]
    assert [row["file"] for row in rows] == [str(seg_images / name) for name in sorted(SIZES)]
    for row in rows:
        with Image.open(row["mask"]) as png:
            assert png.mode == "P" and json.loads(png.info["classes"]) == classes
            mask = np.asarray(png)
        with Image.open(row["file"]) as image:
            assert mask.shape == (image.height, image.width)
        shares = np.array([float(row[f"share_{name}"]) for name in classes])
        assert abs(shares.sum() - 1) < 1e-5
        counted = np.bincount(mask.ravel(), minlength=len(classes)) / mask.size
        np.testing.assert_allclose(shares, counted, atol=1e-6)

    # At the network's own input size the mask is the argmax of its logits, as loaded.
    with Image.open(seg_images / "scene.png") as image:
        batch = trained.transform(image.convert(trained.image_mode))[None]
    with torch.no_grad():
        expected = trained.network(batch)[0].argmax(0).numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(out / "scene_mask.png")), expected)


def test_predict_segmentation_bad_input_is_one_line_and_writes_nothing(
    seg_run, seg_images, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transferlab.cli import main

    _, folder, _ = seg_run
    for extra, message in (
        ("top_k=3", "transferlab: error: top_k=3 ranks the classes of a whole image"),
        (f"out={tmp_path / 'p.csv'}", "a task=segmentation run writes a folder"),
    ):
        args = [f"run={folder}", f"images={seg_images}", f"out={tmp_path / 'masks'}", extra]
        assert main(["predict", *args]) == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert message in line
    assert list(tmp_path.iterdir()) == []


def test_export_segmentation_onnx_matches_pytorch(
    seg_run, trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime

    from transferlab.cli import main

    _, folder, _ = seg_run
    out = tmp_path / "model.onnx"
    assert main(["export", f"run={folder}", "format=onnx", f"out={out}"]) == 0
    shown = capsys.readouterr()
    assert float(re.search(r"max abs difference (\S+)", shown.out).group(1)) <= 1e-4
    assert "Warning" not in shown.err

    batch = torch.randn(3, *trained.input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trained.network(batch).numpy()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": batch.numpy()})
    assert got.shape == (3, len(trained.class_names), 64, 64)  # another batch size than traced
    assert np.abs(got - expected).max() <= 1e-4


def test_mlflow_model_gives_what_predict_gives(seg_run, predicted, seg_images) -> None:
    cwd, _, run_id = seg_run
    out, _ = predicted
    rows = read_rows(out / "predictions.csv")
    shares = list(rows[0])[2:]
    model = load_offline(cwd, run_id)
    signature = model.metadata.signature
    assert signature.inputs.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    assert signature.outputs.input_names() == ["mask", *shares]

    files = [seg_images / name for name in sorted(SIZES)]
    got = model.predict(pd.DataFrame({"image": [path.read_bytes() for path in files]}))
    assert list(got.columns) == ["mask", *shares]
    np.testing.assert_allclose(got[shares].sum(axis=1), 1.0, atol=1e-9)
    assert [row["file"] for row in rows] == [str(path) for path in files]
    for row, png in zip(rows, got["mask"], strict=True):
        assert png == Path(row["mask"]).read_bytes()  # the same mask PNG, byte for byte
    expected = np.array([[float(row[column]) for column in shares] for row in rows])
    np.testing.assert_allclose(got[shares].to_numpy(), expected, atol=1e-6)

    # From Python, uint8 arrays (HxWx3, HxW) give the same masks as their files.
    arrays = [np.asarray(Image.open(path)) for path in files]
    from_arrays = model.predict(pd.DataFrame({"image": arrays}))
    assert list(from_arrays["mask"]) == list(got["mask"])
    first = np.asarray(Image.open(io.BytesIO(got["mask"][0])))
    assert first.shape == arrays[0].shape[:2]
