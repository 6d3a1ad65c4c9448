"""A trained run, ready to use: its network with the best weights, preprocessing and classes.

``load_trained(target)`` takes an MLflow run id, a run folder (``outputs/train/<date>/<time>``)
or a checkpoint inside one. The network is rebuilt from the run's own saved config
(``.hydra/config.yaml``) through the run's task, as training built it but without the
pretrained weights, and the checkpoint is loaded into it. ``transferlab predict``,
``export``, ``explain`` and ``eval`` and the MLflow Model of a run use it.

Preprocessing is the run's data module's eval transform, for an image alone: classification's
as is; segmentation's and detection's, which transform an image with its mask or boxes,
through their ``image_only``.
A segmentation network's logits are resized back to each image's own size before the argmax
(:func:`predicted_masks`), and a mask is written as a palette PNG (:func:`mask_png`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from omegaconf import DictConfig
    from torch import nn

    from transferlab.tasks import Task

SAVED_CONFIG = Path(".hydra") / "config.yaml"
CHECKPOINTS = "checkpoints"
BEST_CHECKPOINT = "best-*.ckpt"
NETWORK_PREFIX = "network."  # the Lightning module's attribute holding the network
SHARE_PREFIX = "share_"  # share_<class name>: the share of an image's pixels predicted as it
MASK_CLASSES_KEY = "classes"  # the PNG text chunk of a mask: its class names, index 0 first
PALETTE_CLASSES = 256  # a palette PNG holds class indices 0-255; more: 16-bit grayscale


@dataclass
class TrainedModel:
    """A run's network (eval mode, CPU, fp32) and what it needs to be used."""

    network: nn.Module
    task: Task
    cfg: DictConfig
    class_names: tuple[str, ...]
    checkpoint: Path
    folder: Path
    run_id: str | None
    # The eval transform of the run's data for one image (PIL image -> C x H x W tensor)
    # and the PIL mode images are converted to first. None for a task without one.
    transform: Callable[[Any], Any] | None
    image_mode: str
    input_size: tuple[int, int, int]

    def require_support(self, hook: str, command: str) -> None:
        """A one-line error unless the run's task supports ``hook`` (``Task``'s hooks for
        using a trained run), naming the tasks that do."""
        from transferlab.tasks.base import require_support

        require_support(self.task, hook, command, self.folder)


def load_trained(target: str | Path, store_dir: str | Path = "mlruns") -> TrainedModel:
    """The run ``target`` names (run id, run folder or checkpoint), with its best weights."""
    folder, checkpoint, run_id = locate(str(target), store_dir)
    cfg = saved_config(folder)
    state = read_checkpoint(checkpoint)
    recorded = run_checkpoint(folder, checkpoint)
    class_names = recorded_class_names(
        state if recorded == checkpoint else read_checkpoint(recorded), recorded
    )
    network, task = build_network(cfg, len(class_names))
    load_weights(network, state["state_dict"], checkpoint, cfg, len(class_names))
    transform, mode, input_size = eval_preprocessing(cfg, task)
    return TrainedModel(
        network, task, cfg, class_names, checkpoint, folder, run_id, transform, mode, input_size
    )


def locate(target: str, store_dir: str | Path) -> tuple[Path, Path, str | None]:
    """(run folder, checkpoint, MLflow run id if known) for a run id, folder or checkpoint."""
    from transferlab.resume import RUN_ID

    path = Path(target).expanduser()
    if path.is_file():
        folder = next((p for p in path.resolve().parents if (p / SAVED_CONFIG).is_file()), None)
        if folder is None:
            raise UserError(
                f"run={target}: no {SAVED_CONFIG} above it; pass a checkpoint inside a run "
                "folder (outputs/train/<date>/<time>/checkpoints/)"
            )
        return folder, path.resolve(), recorded_run_id(folder)
    if path.is_dir():
        folder = path.resolve()
        if not (folder / SAVED_CONFIG).is_file():
            raise UserError(
                f"run={target}: {folder} has no {SAVED_CONFIG}; pass a run folder "
                "(outputs/train/<date>/<time>)"
            )
        return folder, best_checkpoint(folder), recorded_run_id(folder)
    if not RUN_ID.match(target):
        raise UserError(f"run={target}: no such file or folder, nor a 32-character MLflow run id")
    folder = run_id_folder(target, store_dir)
    return folder, best_checkpoint(folder), target


def run_id_folder(run_id: str, store_dir: str | Path) -> Path:
    """The run's output folder; when it is gone (another machine, a cleaned disk), its config
    and best checkpoint downloaded from the run's MLflow artifacts instead."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from transferlab.resume import run_id_folder as output_folder
    from transferlab.tracking.store import existing_store_uri

    label = f"run={run_id}"
    uri = existing_store_uri(store_dir)
    try:
        output_dir = mlflow.MlflowClient(uri).get_run(run_id).data.tags.get("output_dir")
    except MlflowException:
        output_dir = None  # output_folder says what is wrong
    if output_dir and (Path(output_dir) / SAVED_CONFIG).is_file():
        return output_folder(run_id, store_dir, label)
    if output_dir is None:
        output_folder(run_id, store_dir, label)  # raises: no such run
    return downloaded_run(run_id, uri)


def downloaded_run(run_id: str, uri: str) -> Path:
    """A local copy of run ``run_id``'s saved config and best checkpoint (its ``config/`` and
    ``checkpoints/`` artifacts), kept in ``$XDG_CACHE_HOME/transferlab/runs/<run id>``."""
    import os
    import shutil

    import mlflow
    from mlflow.exceptions import MlflowException

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "transferlab" / "runs" / run_id
    if (folder / SAVED_CONFIG).is_file() and list((folder / CHECKPOINTS).glob(BEST_CHECKPOINT)):
        return folder
    partial = folder.with_name(f".{run_id}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    client = mlflow.MlflowClient(uri)
    try:
        for artifacts in ("config", CHECKPOINTS):
            client.download_artifacts(run_id, artifacts, str(partial))
    except (MlflowException, OSError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"run={run_id}: its output folder is gone and its config/checkpoint artifacts "
            f"could not be downloaded ({reason}); was it logged with tracking.log_checkpoint=false?"
        ) from None
    (partial / "config").rename(partial / SAVED_CONFIG.parent)
    if not (partial / SAVED_CONFIG).is_file():
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"run={run_id}: its config artifact has no {SAVED_CONFIG.name}")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    print(f"Downloaded run {run_id}'s config and best checkpoint into {folder}", flush=True)
    return folder


def recorded_run_id(folder: Path) -> str | None:
    from transferlab.resume import RUN_FILE

    info = folder / RUN_FILE
    return json.loads(info.read_text()).get("run_id") if info.is_file() else None


def best_checkpoint(folder: Path) -> Path:
    """The run's best checkpoint (the newest, should a resumed run have left two)."""
    found = sorted((folder / CHECKPOINTS).glob(BEST_CHECKPOINT), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(
            f"{folder} has no {CHECKPOINTS}/{BEST_CHECKPOINT}: the run saved no best "
            "checkpoint (callbacks=none, or it stopped before its first epoch ended)"
        )
    return found[-1]


def run_checkpoint(folder: Path, checkpoint: Path) -> Path:
    """The checkpoint that says which classes the run learned: its best one, else ``checkpoint``."""
    try:
        return best_checkpoint(folder)
    except UserError:
        return checkpoint


def saved_config(folder: Path) -> DictConfig:
    """The run's composed config, its Hydra-runtime ``paths`` set to the run folder."""
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.load(folder / SAVED_CONFIG)
    with open_dict(cfg):
        cfg.paths = {"root": str(folder), "output_dir": str(folder)}
        cfg.model.pretrained = False  # the checkpoint brings every weight
    return cfg


def read_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated, foreign or unsafe file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read the checkpoint {path}: {reason}") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"{path} is not a transferlab training checkpoint (no state_dict)")
    return state


def recorded_class_names(state: dict[str, Any], path: Path) -> tuple[str, ...]:
    """The class names the training module saved in its hyperparameters."""
    hparams = state.get("hyper_parameters") or {}
    names = hparams.get("class_names")
    if not names:
        count = int(hparams.get("num_classes", 0))
        if count < 1:
            raise UserError(f"{path} records no classes (hyper_parameters.class_names)")
        names = [str(i) for i in range(count)]
    return tuple(str(name) for name in names)


def run_task(cfg: DictConfig) -> Task:
    """The task the run's config names."""
    from transferlab.build import task_options
    from transferlab.tasks import build_task

    return build_task(task_options(cfg))


def build_network(cfg: DictConfig, num_classes: int) -> tuple[nn.Module, Task]:
    """The run's network for ``num_classes``, built by its task, without pretrained weights."""
    task = run_task(cfg)
    return task.build_network(cfg.model, num_classes), task


def load_weights(
    network: nn.Module, state_dict: dict[str, Any], checkpoint: Path, cfg: Any, classes: int
) -> None:
    """Load the Lightning module's ``network.*`` weights; a misfit is one line naming it."""
    weights = {
        k.removeprefix(NETWORK_PREFIX): v
        for k, v in state_dict.items()
        if k.startswith(NETWORK_PREFIX)
    }
    expected = network.state_dict()
    fits = f"this run's network (model={cfg.model.name}, {classes} classes)"
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(
            f"{checkpoint} does not fit {fits}: {len(missing)} weight(s) missing, "
            f"{len(unexpected)} unexpected (e.g. {example}); a checkpoint of another model?"
        )
    for key, value in weights.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            shape = "x".join(map(str, value.shape))
            wanted = "x".join(map(str, expected[key].shape))
            raise UserError(
                f"{checkpoint} does not fit {fits}: {key} is {shape}, expected {wanted}; a "
                "checkpoint of another class count or model?"
            )
    network.load_state_dict(weights)
    network.float().eval()


def eval_preprocessing(
    cfg: DictConfig, task: Task
) -> tuple[Callable[[Any], Any] | None, str, tuple[int, int, int]]:
    """The run's eval transform for one image, PIL image mode and input size (C, H, W), as
    its data module builds them (``Task.preprocessing``)."""
    return task.preprocessing(cfg)


def backbone_preprocessing(cfg: DictConfig) -> tuple[None, str, tuple[int, int, int]]:
    """No transform; the backbone's image mode and input size (at ``data.image_size``)."""
    _, mode, size = classification_preprocessing(cfg)
    return None, mode, size


def classification_preprocessing(
    cfg: DictConfig,
) -> tuple[Callable[[Any], Any], str, tuple[int, int, int]]:
    from omegaconf import OmegaConf

    from transferlab.data.transforms import create_eval_transform, image_mode, resolve_data_config
    from transferlab.models import model_data_config

    data = OmegaConf.to_container(cfg.data, resolve=True)
    config = resolve_data_config(model_data_config(cfg.model), data.get("image_size"))
    size = tuple(int(v) for v in config["input_size"])
    return create_eval_transform(config), image_mode(config), size  # type: ignore[return-value]


def paired_preprocessing(
    datamodule_class: type, cfg: DictConfig
) -> tuple[Callable[[Any], Any], str, tuple[int, int, int]]:
    """The eval transform of the run's data module (built, not set up: no data is read),
    which transforms an image with its targets, for an image alone."""
    from omegaconf import OmegaConf

    from transferlab.models import model_data_config

    data = OmegaConf.to_container(cfg.data, resolve=True)
    try:
        datamodule = datamodule_class(**data, data_config=model_data_config(cfg.model))
    except TypeError as err:
        raise UserError(f"the run's data config: {err}") from None
    size = tuple(int(v) for v in datamodule.data_config["input_size"])
    return datamodule.eval_transform.image_only, "RGB", size  # type: ignore[return-value]


def predicted_masks(
    network: nn.Module, batch: torch.Tensor, sizes: Sequence[tuple[int, int]]
) -> list[torch.Tensor]:
    """Each image's class-index mask at its own (H, W) in ``sizes``: the segmentation
    network's logits for the preprocessed ``batch``, resized (bilinear), then the argmax."""
    import torch.nn.functional as F

    masks = []
    for scores, size in zip(network(batch).float(), sizes, strict=True):
        resized = F.interpolate(
            scores[None], size=tuple(size), mode="bilinear", align_corners=False
        )
        masks.append(resized[0].argmax(0))
    return masks


def predicted_boxes(
    network: nn.Module, batch: torch.Tensor, sizes: Sequence[tuple[int, int]]
) -> list[dict[str, torch.Tensor]]:
    """Each image's detections (``boxes`` xyxy, ``scores``, ``labels``, highest score first)
    with the boxes in pixels of the image's own (H, W) in ``sizes``: the detector's output
    for the preprocessed (resized) ``batch``, scaled back."""
    height, width = batch.shape[-2:]
    found = []
    import torch

    for image, (h, w) in zip(network(batch), sizes, strict=True):
        scale = torch.tensor([w / width, h / height, w / width, h / height])
        order = image["scores"].float().argsort(descending=True)
        found.append(
            {
                "boxes": image["boxes"][order].float().cpu() * scale,
                "scores": image["scores"][order].float().cpu(),
                "labels": image["labels"][order].cpu(),
            }
        )
    return found


def kept_detections(
    image: Mapping[str, torch.Tensor], class_names: Sequence[str], min_score: float
) -> list[dict[str, Any]]:
    """An image's detections (``predicted_boxes``) scoring at least ``min_score``, highest
    first: ``{"class", "score", "box": [x1, y1, x2, y2]}`` each."""
    return [
        {"class": class_names[int(label)], "score": float(score), "box": box}
        for box, score, label in zip(
            image["boxes"].tolist(), image["scores"].tolist(), image["labels"].tolist(), strict=True
        )
        if score >= min_score
    ]


def class_shares(mask: torch.Tensor, num_classes: int) -> list[float]:
    """The share of the mask's pixels predicted as each class (they sum to 1)."""
    counts = mask.flatten().bincount(minlength=num_classes)
    return [int(count) / mask.numel() for count in counts]


def mask_png(mask: torch.Tensor | np.ndarray, class_names: Sequence[str]) -> bytes:
    """A class-index mask as PNG file bytes: a palette PNG whose pixel values are the class
    indices, coloured as the run's report colours them (class 0 dark), its class names in
    the text chunk ``classes`` (a JSON list, index 0 first); 16-bit grayscale beyond 256
    classes."""
    import io

    import numpy as np
    from PIL import Image, PngImagePlugin

    from transferlab.reports.segmentation import colour_mask, palette

    indices = np.asarray(mask)
    info = PngImagePlugin.PngInfo()
    info.add_text(MASK_CLASSES_KEY, json.dumps(list(class_names)))
    if len(class_names) <= PALETTE_CLASSES:
        image = Image.fromarray(indices.astype(np.uint8))  # L: putpalette makes it P
        every = np.arange(len(class_names))[None]
        colours = colour_mask(every, palette(len(class_names)), ignore=-1)[0]
        image.putpalette((colours * 255).round().astype(np.uint8).flatten().tolist())
    else:
        image = Image.fromarray(indices.astype(np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
