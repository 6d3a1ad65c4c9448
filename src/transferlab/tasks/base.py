"""The ``Task`` contract and its registry (``task=<name>``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from transferlab.errors import UserError

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torchmetrics import Metric, MetricCollection

    from transferlab.module import TransferModule
    from transferlab.tracking import TrackedRun

TASKS: dict[str, type[Task]] = {}
BUILT_IN = ("classification", "segmentation", "detection", "embedding")


@dataclass
class Step:
    """What one batch gives the module: the loss to train on or log, and the outputs the
    split's metrics update with.

    ``loss`` is None where the outputs carry no loss (a detector's detections in
    validation: no ``val/loss``); ``outputs`` is None where the split has no metrics (a
    detector's training step, which returns losses, not detections); ``terms`` are parts
    of the loss, logged per epoch as ``<split>/<name>``.
    """

    loss: Tensor | None
    outputs: Any
    terms: Mapping[str, Tensor] = field(default_factory=dict)


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make a ``Task`` subclass available as ``task=<name>``."""

    def register(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASKS[name] = cls
        return cls

    return register


class Task:
    """One job transfer learning is used for. Subclasses fill in each hook.

    Batches are dicts: ``image`` (or ``features`` when the feature cache serves the head)
    plus the task's ``target`` key (``label``, ``mask``, ...). Networks expose their
    pretrained ``backbone`` (a timm model, whose stages the freezing strategies use) and
    their new parts as ``head``; that is the whole contract the strategies rely on.
    """

    name: ClassVar[str] = ""
    target: ClassVar[str] = "label"
    # Whether cached pooled backbone features can stand in for images (a frozen backbone).
    supports_feature_cache: ClassVar[bool] = False
    # Whether targets are per pixel, so geometric corruptions (shift.GEOMETRIC) do not apply.
    spatial_targets: ClassVar[bool] = False
    # The test metrics a sweep's comparison table shows, most important first.
    compare_metrics: ClassVar[tuple[str, ...]] = ()
    # The report's figures MLflow's Compare view shows side by side (also logged at the
    # root of the run's artifacts, under their file names).
    compare_figures: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: Any) -> None:
        if options:
            raise UserError(
                f"task={self.name} has no option(s) {', '.join(sorted(options))}; "
                f"see conf/task/{self.name}.yaml"
            )

    def build_datamodule(self, cfg: Any) -> pl.LightningDataModule:
        """The set-up data module (``num_classes`` and ``class_names`` known)."""
        raise NotImplementedError

    def build_network(self, model_cfg: Any, num_classes: int) -> nn.Module:
        """The network: a pretrained ``backbone`` and new ``head`` parts."""
        raise NotImplementedError

    def criterion(self, cfg: Any) -> nn.Module | None:
        """The training loss (``module.criterion``); the default steps call it as
        ``criterion(outputs, target)``. None where the network's head holds its loss (a
        loss with parameters of its own, which must train as the head does)."""
        raise NotImplementedError

    def metrics(self, num_classes: int) -> MetricCollection:
        """Metrics accumulated over a whole split, cloned with ``val/`` and ``test/`` (and
        ``train/``, unless ``train_metrics`` says otherwise)."""
        raise NotImplementedError

    def train_metrics(self, num_classes: int) -> MetricCollection | None:
        """The metrics accumulated over the training split: ``metrics``; None for none (where
        they would need an extra forward pass)."""
        return self.metrics(num_classes)

    def training_step(self, module: TransferModule, batch: Mapping[str, Any]) -> Step:
        """A training batch's loss and the outputs for the train metrics: the network's
        outputs (the head's alone on cached features) and ``criterion(outputs, target)``."""
        outputs = module.outputs(batch)
        return Step(module.criterion(outputs, batch[self.target]), outputs)

    def evaluation_step(self, module: TransferModule, batch: Mapping[str, Any]) -> Step:
        """A validation or test batch's loss and outputs, in the run's eval precision
        (``module.infer``)."""
        outputs = module.infer(batch)
        return Step(module.criterion(outputs, batch[self.target]), outputs)

    def test_state(self, num_classes: int) -> dict[str, Metric]:
        """Extra metrics accumulated over the test split for the report (e.g. a confusion matrix)."""
        return {}

    def shifted_test_set(self, datamodule: Any, corruption: str, severity: int, seed: int) -> Any:
        """The test split with ``corruption`` at ``severity`` applied to each image after
        resizing and before normalisation (``transferlab.shift``), deterministic for ``seed``."""
        raise UserError(f"shift=corruptions does not support task={self.name} yet")

    def report(self, run: TrackedRun, cfg: Any, module: Any, datamodule: Any) -> None:
        """Log the test report (figures, per-class tables) to the run, after testing.

        ``module.test_state`` holds what ``test_state`` accumulated over the test split.
        """

    # Using a trained run (``transferlab.inference``): the hooks below that a task does not
    # override are what its runs do not support; the commands say so in one line, naming
    # the tasks that do (``supporting``).
    # The pyfunc model of the task's runs as ``module:Class`` (``tracking.model``), or None.
    serving_model: ClassVar[str | None] = None
    # Whether ``transferlab export`` writes the task's networks as ONNX (logits out).
    exportable: ClassVar[bool] = False
    # Whether the networks output L2-normalised embeddings (``transferlab embed``, ``verify``).
    embeds: ClassVar[bool] = False

    def preprocessing(self, cfg: Any) -> tuple[Any, str, tuple[int, int, int]]:
        """The run's eval transform for one PIL image (None: none known), its image mode and
        its input size (C, H, W), as the run's data module builds them; by default the
        backbone's mode and size, no transform."""
        from transferlab.inference import backbone_preprocessing

        return backbone_preprocessing(cfg)

    def predict(self, model: Any, request: Any) -> None:
        """``transferlab predict``: write the predictions of ``request.files``
        (``transferlab.predict.Request``) where ``request.out`` says."""
        raise NotImplementedError

    def explain_titles(
        self, class_names: Sequence[str], outputs: Any, explained: Sequence[int]
    ) -> list[str]:
        """``transferlab explain``: each heat map's title from the network's ``outputs``
        and the class it explains."""
        raise NotImplementedError


def supporting(hook: str) -> list[str]:
    """The registered tasks that override ``hook`` (a method) or set it (an attribute)."""
    build_task({"name": "classification"})  # every built-in task registered
    default = getattr(Task, hook)
    return [
        name for name, cls in sorted(TASKS.items()) if getattr(cls, hook) not in (default, False)
    ]


def require_support(task: Task, hook: str, command: str, where: Any) -> None:
    """A one-line error unless ``task`` supports ``hook``, naming the tasks that do."""
    names = supporting(hook)
    if task.name not in names:
        supported = " and ".join(f"task={name}" for name in names)
        raise UserError(f"{command} supports {supported} runs; {where} is a task={task.name} run")


def photometric_test_set(
    task: Task, datamodule: Any, corruption: str, severity: int, seed: int
) -> Any:
    """The test split with ``corruption`` on each image alone after resizing, for a task
    whose targets sit on pixels (masks, boxes) and whose eval transform is a paired v2
    pipeline; a geometric corruption (``shift.GEOMETRIC``) would move the pixels off their
    targets and is one line."""
    import copy

    from transferlab.data.seg_transforms import with_image_step
    from transferlab.shift import GEOMETRIC, Corruption

    if corruption in GEOMETRIC:
        raise UserError(
            f"shift corruption {corruption} moves pixels away from their targets: choose "
            f"photometric corruptions for task={task.name}"
        )
    shifted = copy.copy(datamodule.test_set)
    step = Corruption(corruption, severity, seed)
    shifted.transform = with_image_step(datamodule.eval_transform, step)
    return shifted


def construct_datamodule(factory: Callable[..., Any], cfg: Any, **extra: Any) -> Any:
    """``factory`` called with the ``data`` group, the seed, the backbone's preprocessing and
    the augmentation, then set up; a wrong data key becomes a one-line error."""
    from omegaconf import OmegaConf

    from transferlab.models import model_data_config

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    augment = OmegaConf.to_container(cfg.augment, resolve=True) if cfg.get("augment") else None
    check_source = getattr(factory, "check_source", None)
    if check_source is not None:  # before the keys, which differ between tasks' sources
        check_source(data_cfg.get("source"))
    try:
        datamodule = factory(
            **data_cfg,
            seed=cfg.seed,
            data_config=model_data_config(cfg.model),
            augment=augment,
            **extra,
        )
    except TypeError as err:
        raise UserError(f"data config: {err}") from None
    datamodule.setup("fit")
    return datamodule


def build_task(cfg: Mapping[str, Any] | None) -> Task:
    """The task named by the ``task`` config group (classification when absent)."""
    for module in BUILT_IN:  # importing a task module registers it
        importlib.import_module(f"transferlab.tasks.{module}")
    options = dict(cfg or {})
    name = str(options.pop("name", "classification"))
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}: choose task= from {', '.join(sorted(TASKS))}")
    return TASKS[name](**options)
