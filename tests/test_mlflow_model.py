"""A run's best model as an MLflow Model, from the real CLI's run and store: loaded with
``mlflow.pyfunc`` and served by ``mlflow models predict``, offline, it gives what
``transferlab predict`` gives for the same image files."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from clitools import BIN
from PIL import Image

CLASSES = [str(digit) for digit in range(10)]
# Any download would go to a proxy that is not there.
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": "", "PIP_NO_INDEX": "1", "HF_HUB_OFFLINE": "1"}  # fmt: skip


def store(cwd: Path) -> str:
    return f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}"


def load_offline(cwd: Path, run_id: str):
    """``runs:/<run id>/model`` from the store in ``cwd``, loaded with no network."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        patch.setenv("MLFLOW_TRACKING_URI", store(cwd))  # restored afterwards
        mlflow.set_tracking_uri(store(cwd))
        return mlflow.pyfunc.load_model(f"runs:/{run_id}/model")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Six digits as 8x8 grayscale PNG files, as the digits source scales them."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    paths = []
    for i in range(6):
        paths.append(folder / f"digit{i}.png")
        Image.fromarray((digits.images[i] * 255 / 16).round().astype(np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def model(trained_run):
    """``runs:/<run id>/model`` of the shared trained run, loaded offline."""
    cwd, _, run_id = trained_run
    return load_offline(cwd, run_id)


def image_files(paths: list[Path]) -> pd.DataFrame:
    return pd.DataFrame({"image": [path.read_bytes() for path in paths]})


def test_the_run_logs_its_best_model_with_a_signature_and_an_example(
    trained_run, model, tmp_path: Path
) -> None:
    cwd, folder, run_id = trained_run
    client = mlflow.MlflowClient(store(cwd))
    run = client.get_run(run_id)
    (output,) = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.name == "model" and logged.source_run_id == run_id
    assert 0 < run.data.metrics["time/log_model_s"] < 60

    signature = model.metadata.signature
    assert signature.inputs.to_dict() == [{"type": "binary", "name": "image", "required": True}]
    assert signature.outputs.input_names() == [*CLASSES, "predicted"]
    # The input example is a test image, as a tiny PNG file.
    local = mlflow.artifacts.download_artifacts(
        f"runs:/{run_id}/model", dst_path=str(tmp_path), tracking_uri=store(cwd)
    )
    example = model.metadata.load_input_example(local)
    (png,) = example["image"]
    assert png.startswith(b"\x89PNG") and len(png) < 1000
    assert Image.open(io.BytesIO(png)).size == (8, 8)
    # Its files: the saved config and the best weights, without the optimizer state.
    (checkpoint,) = Path(local, "artifacts", "run", "checkpoints").glob("best-*.ckpt")
    assert Path(local, "artifacts", "run", ".hydra", "config.yaml").is_file()
    best = next((folder / "checkpoints").glob("best-*.ckpt"))
    assert checkpoint.name == best.name and checkpoint.stat().st_size < best.stat().st_size / 2


def test_loaded_model_gives_what_transferlab_predict_gives(trained_run, model, images) -> None:
    from transferlab.inference import load_trained
    from transferlab.predict import predict_rows

    cwd, _, run_id = trained_run
    rows, skipped = predict_rows(load_trained(run_id, cwd / "mlruns"), images, 10, 64)
    assert not skipped
    expected = np.array(
        [
            [dict(zip(row[1::2], map(float, row[2::2]), strict=True))[c] for c in CLASSES]
            for row in rows
        ]
    )

    out = model.predict(image_files(images))
    assert list(out.columns) == [*CLASSES, "predicted"]
    probs = out[CLASSES].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert list(out["predicted"]) == [CLASSES[i] for i in probs.argmax(axis=1)]

    # From Python, uint8 arrays (HxW, HxWx3) give the same as their PNG files.
    gray = [np.asarray(Image.open(path)) for path in images]
    for cells in (gray, [np.stack([g] * 3, axis=-1) for g in gray]):
        got = model.predict(pd.DataFrame({"image": cells}))
        np.testing.assert_allclose(got[CLASSES].to_numpy(), probs, atol=1e-6)
    with pytest.raises(Exception, match="row 1 of 'image' is not an image"):
        model.predict(pd.DataFrame({"image": [images[0].read_bytes(), b"not an image"]}))


@pytest.mark.slow  # 30-140 s on 2 cores: `make test-slow` runs it
def test_mlflow_models_predict_serves_it_offline(trained_run, model, images, tmp_path) -> None:
    cwd, _, run_id = trained_run
    request = tmp_path / "request.json"
    data = [[base64.b64encode(path.read_bytes()).decode()] for path in images]
    request.write_text(json.dumps({"dataframe_split": {"columns": ["image"], "data": data}}))
    out = tmp_path / "predictions.json"
    result = subprocess.run(
        [str(BIN / "mlflow"), "models", "predict", "-m", f"runs:/{run_id}/model",
         "--env-manager", "local", "-i", str(request), "-t", "json", "-o", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, **OFFLINE, "MLFLOW_TRACKING_URI": store(cwd)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    served = pd.DataFrame(json.loads(out.read_text())["predictions"])
    expected = model.predict(image_files(images))
    assert list(served.columns) == [*CLASSES, "predicted"]
    np.testing.assert_allclose(served[CLASSES].to_numpy(), expected[CLASSES].to_numpy(), atol=1e-6)
    assert list(served["predicted"]) == list(expected["predicted"])


def test_best_child_without_a_model_is_one_line_and_registers_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transferlab.sweeps.callback import crown_champion

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    child = client.create_run(experiment).info.run_id
    parent = client.create_run(experiment, tags={"sweep.best_run_id": child}).info.run_id
    capsys.readouterr()
    crown_champion(client, parent, "e")
    shown = capsys.readouterr()
    assert shown.out.splitlines() == [
        f"The best run {child} has no MLflow model (tracking.log_model=false?): nothing "
        "registered as 'e'"
    ]
    assert "warning" not in shown.err
    assert client.search_registered_models() == []


def test_a_model_that_cannot_be_logged_is_one_warning_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from transferlab.tracking.record import record_model

    # Not MLflow's active run: logging fails.
    run = SimpleNamespace(run_id="0" * 32, send=lambda what, call: call())
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}})
    from transferlab.tasks import build_task

    tasks = [build_task({"name": name}) for name in ("classification", "segmentation")]
    tasks.append(SimpleNamespace(name="unregistered", serving_model=None))
    for task in tasks:
        record_model(run, cfg, task, None, tmp_path / "best-epoch00.ckpt")
    shown = capsys.readouterr()
    assert shown.err.splitlines() == 2 * [
        "transferlab: warning: the best model was not logged as an MLflow Model "
        f"(RuntimeError: run {run.run_id} is not MLflow's active run)"
    ]
    assert shown.out.splitlines() == [
        "No MLflow model logged: task=unregistered runs are not supported yet"
    ]
