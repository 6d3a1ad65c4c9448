"""A run's best model as an MLflow Model, and a sweep's best one registered as the champion.

``log_model`` logs a run's best checkpoint as ``runs:/<run id>/model``: a pyfunc model that
takes raw images and returns what ``transferlab predict`` gives for them, preprocessing
included (the run's eval transform, through ``transferlab.inference.load_trained``).

Input: a DataFrame with one column ``image`` (signature type ``binary``) of encoded image
files, PNG or JPEG bytes; JSON carries them as base64 (``mlflow models predict``, a serving
endpoint). The column is binary rather than a pixel tensor because files are what a client
has, and one column type cannot hold both bytes and arrays of varying shape. From Python, a
cell may also be a uint8 array (HxW or HxWxC) or base64 text (a CSV input): MLflow passes
an object column to a binary field unchanged, and the model decodes each cell by its type.

Output of a classification run (``ImageClassifier``): one probability column per class
name, then ``predicted``, the most probable class.

Output of a segmentation run (``ImageSegmenter``): ``mask``, the predicted class of each
pixel at the input image's own size as PNG file bytes (the palette PNG ``transferlab
predict`` writes, byte for byte: pixel values are class indices, the class names are in its
text chunk ``classes``), then ``share_<class>`` per class, the share of the image's pixels
predicted as it. PNG bytes rather than an array of indices: a signature column of type
``binary`` holds a mask of any size, where a tensor spec needs one shape for the whole
batch; and a mask is a few kB of PNG (base64 in JSON) where nested lists of indices are
several bytes of JSON per pixel. ``numpy.asarray(PIL.Image.open(io.BytesIO(cell)))`` gives
the (H, W) indices back.

Output of a detection run (``ImageDetector``): ``detections``, a JSON list of the boxes
scoring at least the ``min_score`` param (default 0.5, as ``transferlab predict``), highest
first: ``{"class", "score", "box": [x1, y1, x2, y2]}`` in pixels of the input image's own
size; and ``boxes``, their number. JSON text: an image has any number of boxes.

``register_champion`` registers a sweep's best child's model and points the alias
``champion`` at that version, whatever the run's task.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import mlflow.pyfunc
import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models import ModelSignature

MODEL_NAME = "model"  # runs:/<run id>/model
IMAGE_COLUMN = "image"
PREDICTED_COLUMN = "predicted"
MASK_COLUMN = "mask"
DETECTIONS_COLUMN = "detections"
BOXES_COLUMN = "boxes"
MIN_SCORE_PARAM = "min_score"
RUN_ARTIFACT = "run"  # the model's artifact: a run folder, as load_trained takes it
CHAMPION = "champion"
BATCH_SIZE = 64
EXAMPLE_SIZE = 64  # pixels a side at most: the input example is a test image, shrunk
# What loading the model needs, pinned to the versions it was logged with. Listed, not
# inferred: inferring runs the model in a subprocess, seconds per run.
REQUIREMENTS = (
    "transferlab",
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "pillow",
    "numpy",
    "pandas",
)
# Models from code: MLflow runs this file to get the model, so no pickle is stored.
MODEL_CODE = """\
from mlflow.models import set_model

from {module} import {name}

set_model({name}())
"""


class RunModel(mlflow.pyfunc.PythonModel):
    """A trained run's best model with its preprocessing: images in (see the module
    docstring). Subclasses give a task's outputs and their signature."""

    code_file: ClassVar[str] = ""
    requirements: ClassVar[tuple[str, ...]] = ()

    def load_context(self, context: Any) -> None:
        from transferlab.inference import load_trained

        self.trained = load_trained(context.artifacts[RUN_ARTIFACT])

    def image_batches(self, model_input: pd.DataFrame) -> Iterator[list[Any]]:
        """The input's images, decoded, in batches of ``BATCH_SIZE``."""
        if IMAGE_COLUMN not in model_input:
            raise ValueError(f"the input has no column {IMAGE_COLUMN!r} of images")
        cells = list(model_input[IMAGE_COLUMN])
        mode = self.trained.image_mode
        for start in range(0, len(cells), BATCH_SIZE):
            chunk = cells[start : start + BATCH_SIZE]
            yield [decode_image(cell, start + i, mode) for i, cell in enumerate(chunk)]

    @staticmethod
    def model_signature(class_names: Sequence[str]) -> ModelSignature:
        raise NotImplementedError


class ImageClassifier(RunModel):
    """Images in, class probabilities and the top class out."""

    code_file = "image_classifier.py"

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        import torch

        trained = self.trained
        names = list(trained.class_names)
        chunks = [torch.zeros(0, len(names))]
        with torch.inference_mode():
            for images in self.image_batches(model_input):
                batch = torch.stack([trained.transform(image) for image in images])
                chunks.append(trained.network(batch).float().softmax(1))
        probs = torch.cat(chunks).double().numpy()
        out = pd.DataFrame(probs, columns=names, index=model_input.index)
        out[PREDICTED_COLUMN] = [names[i] for i in probs.argmax(1)]
        return out

    @staticmethod
    def model_signature(class_names: Sequence[str]) -> ModelSignature:
        from mlflow.types import ColSpec, DataType

        if PREDICTED_COLUMN in class_names:
            raise ValueError(f"a class is named {PREDICTED_COLUMN!r}, as the top-class column is")
        return image_signature(
            [ColSpec(DataType.double, name) for name in class_names]
            + [ColSpec(DataType.string, PREDICTED_COLUMN)]
        )


class ImageSegmenter(RunModel):
    """Images in, each one's mask (PNG bytes) and class shares out."""

    code_file = "image_segmenter.py"
    requirements = ("segmentation-models-pytorch", "matplotlib")

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        import torch

        from transferlab.inference import class_shares, mask_png, predicted_masks

        trained = self.trained
        names = list(trained.class_names)
        masks = []
        with torch.inference_mode():
            for images in self.image_batches(model_input):
                batch = torch.stack([trained.transform(image) for image in images])
                sizes = [(image.height, image.width) for image in images]
                masks.extend(predicted_masks(trained.network, batch, sizes))
        shares = np.array([class_shares(mask, len(names)) for mask in masks], dtype=np.float64)
        shares = shares.reshape(len(masks), len(names))
        columns = {MASK_COLUMN: [mask_png(mask, names) for mask in masks]}
        columns.update({column: shares[:, i] for i, column in enumerate(share_columns(names))})
        return pd.DataFrame(columns, index=model_input.index)

    @staticmethod
    def model_signature(class_names: Sequence[str]) -> ModelSignature:
        from mlflow.types import ColSpec, DataType

        return image_signature(
            [ColSpec(DataType.binary, MASK_COLUMN)]
            + [ColSpec(DataType.double, column) for column in share_columns(class_names)]
        )


class ImageDetector(RunModel):
    """Images in, each one's boxes (JSON) and their number out."""

    code_file = "image_detector.py"

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        import json

        import torch

        from transferlab.inference import kept_detections, predicted_boxes
        from transferlab.predict import MIN_SCORE

        min_score = float((params or {}).get(MIN_SCORE_PARAM, MIN_SCORE))
        trained = self.trained
        found = []
        with torch.inference_mode():
            for images in self.image_batches(model_input):
                batch = torch.stack([trained.transform(image) for image in images])
                sizes = [(image.height, image.width) for image in images]
                for image in predicted_boxes(trained.network, batch, sizes):
                    found.append(kept_detections(image, trained.class_names, min_score))
        return pd.DataFrame(
            {
                DETECTIONS_COLUMN: [json.dumps(boxes) for boxes in found],
                BOXES_COLUMN: np.array([len(boxes) for boxes in found], dtype=np.int64),
            },
            index=model_input.index,
        )

    @staticmethod
    def model_signature(class_names: Sequence[str]) -> ModelSignature:
        from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec

        from transferlab.predict import MIN_SCORE

        signature = image_signature(
            [ColSpec(DataType.string, DETECTIONS_COLUMN), ColSpec(DataType.long, BOXES_COLUMN)]
        )
        signature.params = ParamSchema([ParamSpec(MIN_SCORE_PARAM, DataType.double, MIN_SCORE)])
        return signature


def serving_class(path: str) -> type[RunModel]:
    """The pyfunc model class a task names (``Task.serving_model``, ``module:Class``)."""
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def share_columns(class_names: Sequence[str]) -> list[str]:
    from transferlab.inference import SHARE_PREFIX

    return [SHARE_PREFIX + name for name in class_names]


def image_signature(outputs: list[Any]) -> ModelSignature:
    """The ``image`` binary column in, ``outputs`` out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]), outputs=Schema(outputs)
    )


def decode_image(cell: Any, row: int, mode: str) -> Any:
    """One input cell as a PIL image in ``mode``; a cell that is no image is one line."""
    from PIL import Image

    from transferlab.data.datasets import to_mode

    try:
        if isinstance(cell, np.ndarray):
            image = image_from_array(cell)
        else:
            data = base64.b64decode(cell) if isinstance(cell, str) else bytes(cell)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (OSError, ValueError, TypeError, binascii.Error) as err:
        raise ValueError(
            f"row {row} of {IMAGE_COLUMN!r} is not an image: expected PNG/JPEG file bytes "
            f"(base64 in JSON or CSV) or a uint8 HxW or HxWxC array ({err})"
        ) from None
    return to_mode(image, mode)


def image_from_array(pixels: np.ndarray) -> Any:
    from PIL import Image

    if pixels.dtype != np.uint8:
        raise TypeError(f"the array is {pixels.dtype}, not uint8")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim != 2 and not (pixels.ndim == 3 and pixels.shape[2] in (3, 4)):
        raise TypeError(f"the array is {pixels.shape}, not HxW or HxWxC with C 1, 3 or 4")
    return Image.fromarray(np.ascontiguousarray(pixels))


def example_input(datamodule: Any) -> pd.DataFrame:
    """The first test image as a PNG file."""
    test = datamodule.test_set
    image = test.images.load(int(test.indices[0]))
    if isinstance(image, tuple):  # a segmentation set's (image, mask)
        image = image[0]
    image.thumbnail((EXAMPLE_SIZE, EXAMPLE_SIZE))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [buffer.getvalue()]})


def pip_requirements(extra: Sequence[str] = ()) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for name in (*REQUIREMENTS, *extra):
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


def pack_run_folder(config: Path, checkpoint: Path, folder: Path) -> tuple[str, ...]:
    """Write a run folder that ``load_trained`` takes: the saved config, and the best
    checkpoint without its optimizer state (a third of its size with AdamW). Returns the
    class names the checkpoint records."""
    import torch

    from transferlab.inference import (
        CHECKPOINTS,
        NETWORK_PREFIX,
        SAVED_CONFIG,
        read_checkpoint,
        recorded_class_names,
    )

    state = read_checkpoint(checkpoint)
    (folder / SAVED_CONFIG).parent.mkdir(parents=True)
    shutil.copyfile(config, folder / SAVED_CONFIG)
    (folder / CHECKPOINTS).mkdir()
    weights = {k: v for k, v in state["state_dict"].items() if k.startswith(NETWORK_PREFIX)}
    hparams = state.get("hyper_parameters") or {}
    torch.save(
        {"state_dict": weights, "hyper_parameters": hparams}, folder / CHECKPOINTS / checkpoint.name
    )
    return recorded_class_names(state, checkpoint)


@contextlib.contextmanager
def no_artifact_progress_bars() -> Iterator[None]:
    """Quiet MLflow's progress bars while it copies the model's files."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def log_model(run_id: str, run_folder: Path, checkpoint: Path, datamodule: Any) -> float:
    """Log ``checkpoint`` of the run in ``run_folder`` as ``runs:/<run id>/model`` (the
    active run's), the pyfunc model of the run's task (``Task.serving_model``); the seconds
    it took."""
    from transferlab.inference import SAVED_CONFIG, run_task, saved_config

    started = time.perf_counter()
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        raise RuntimeError(f"run {run_id} is not MLflow's active run")
    task = run_task(saved_config(run_folder))
    if task.serving_model is None:
        raise ValueError(f"task={task.name} runs have no MLflow model")
    model = serving_class(task.serving_model)
    with tempfile.TemporaryDirectory() as tmp, no_artifact_progress_bars():
        folder = Path(tmp) / RUN_ARTIFACT
        class_names = pack_run_folder(run_folder / SAVED_CONFIG, checkpoint, folder)
        code = Path(tmp) / model.code_file
        code.write_text(MODEL_CODE.format(module=model.__module__, name=model.__name__))
        mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=code,
            artifacts={RUN_ARTIFACT: str(folder)},
            signature=model.model_signature(class_names),
            input_example=example_input(datamodule),
            pip_requirements=pip_requirements(model.requirements),
        )
    return time.perf_counter() - started


def logged_model_id(client: MlflowClient, run_id: str) -> str | None:
    """The id of run ``run_id``'s model (the LoggedModel ``runs:/<run id>/model`` names)."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"name = '{MODEL_NAME}' AND source_run_id = '{run_id}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
    )
    return found[0].model_id if found else None


def register_champion(
    client: MlflowClient, run_id: str, name: str, tags: dict[str, str] | None = None
) -> ModelVersion | None:
    """Register run ``run_id``'s model as a version of ``name`` and point the alias
    ``champion`` at it; None when the run logged no model. A run that is the champion
    already (a resumed search) keeps its version."""
    from mlflow.exceptions import MlflowException

    model_id = logged_model_id(client, run_id)
    if model_id is None:
        return None
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        with contextlib.suppress(MlflowException):  # no champion yet
            current = client.get_model_version_by_alias(name, CHAMPION)
            if current.run_id == run_id:
                return current
    version = client.create_model_version(
        name, f"models:/{model_id}", run_id=run_id, tags=tags, model_id=model_id
    )
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return version
