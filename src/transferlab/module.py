"""The LightningModule: any task's network, loss, metrics and optimizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from transferlab.finetune import FinetuneStrategy, build_strategy
from transferlab.optim import OptimizerFactory, SchedulerFactory, apply_lr_mult
from transferlab.runtime import Runtime
from transferlab.tasks import Task, build_task


@contextlib.contextmanager
def metric_updates(device: torch.device) -> Iterator[None]:
    """Let torchmetrics use torch's bincount on CPU in a deterministic run.

    Under ``torch.use_deterministic_algorithms`` torchmetrics replaces bincount by a
    comparison against every bin, which costs pixels x classes^2 for a segmentation batch
    (1.2 s against 0.28 s for one batch of 32 masks at 128 px, 11 classes). The CPU bincount
    is deterministic, so results are identical.
    """
    if device.type != "cpu" or not torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


class TransferModule(pl.LightningModule):
    """Trains ``network`` (``.backbone`` + ``.head``) with the task's loss and metrics.

    The task (classification by default) gives the loss, the metrics, the batch's target
    key and the test state its report needs. The fine-tuning strategy (also a callback of
    the Trainer) decides the parameter groups and their learning-rate multipliers, and which
    of them train in each epoch. Batches are dicts: ``image``, or ``features`` when the
    feature cache serves the head alone, plus the target. ``runtime`` sets the memory format
    of the network and its inputs, and the precision of validation and test.
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        finetune: FinetuneStrategy | None = None,
        label_smoothing: float = 0.0,
        class_names: Sequence[str] | None = None,
        runtime: Runtime | None = None,
        task: Task | None = None,
        criterion: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=[
                "network",
                "optimizer",
                "scheduler",
                "finetune",
                "runtime",
                "task",
                "criterion",
            ],
        )
        self.task = task or build_task(None)
        self.runtime = runtime or Runtime()
        self.network = self.runtime.prepare(network)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.finetune = finetune or build_strategy({"strategy": "full"})
        self.criterion = criterion or self.task.criterion(
            {"loss": {"label_smoothing": label_smoothing}}
        )
        metrics = self.task.metrics(num_classes)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.test_state = nn.ModuleDict(self.task.test_state(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.runtime.inputs(x))

    def outputs(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The network's outputs for a batch: cached features go through the head alone."""
        if "features" in batch:
            return self.network.head(batch["features"])
        return self(batch["image"])

    def infer(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Outputs for evaluation, in fp32 whatever precision computed them."""
        with self.runtime.inference(self.device.type):
            return self.outputs(batch).float()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int):
        target = batch[self.task.target]
        outputs = self.outputs(batch)
        loss = self.criterion(outputs, target)
        with metric_updates(outputs.device):
            self.train_metrics.update(outputs, target)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss if loss.requires_grad else None  # None: nothing trains (a solved probe)

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        target = batch[self.task.target]
        outputs = self.infer(batch)
        self.log("val/loss", self.criterion(outputs, target), on_epoch=True)
        with metric_updates(outputs.device):
            self.val_metrics.update(outputs, target)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        target = batch[self.task.target]
        outputs = self.infer(batch)
        self.log("test/loss", self.criterion(outputs, target), on_epoch=True)
        with metric_updates(outputs.device):
            self.test_metrics.update(outputs, target)
            for metric in self.test_state.values():
                metric.update(outputs, target)

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()
        for metric in self.test_state.values():
            metric.reset()

    def on_test_epoch_end(self) -> None:
        # Not reset here: the task's report may read what the test metrics accumulated.
        self.log_dict(self.test_metrics.compute())

    def configure_optimizers(self):
        groups = self.finetune.param_groups(self.network)
        optimizer = self.optimizer_factory(groups)
        apply_lr_mult(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(1, total_steps // max(1, self.trainer.max_epochs or 1))
        restarts = [epoch * steps_per_epoch for epoch in self.finetune.restart_epochs()]
        scheduler = self.scheduler_factory(
            optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, restarts=restarts
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
