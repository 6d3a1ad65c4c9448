"""The LightningModule: a backbone with a new head, its loss, metrics and optimizer."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from transferlab.finetune import FinetuneStrategy
from transferlab.optim import OptimizerFactory, SchedulerFactory, apply_lr_mult
from transferlab.runtime import Runtime


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, macro-F1 and, with more than five classes, top-5 accuracy."""
    metrics: dict[str, nn.Module] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


class TransferModule(pl.LightningModule):
    """Trains ``network`` (a ``Classifier``: ``.backbone`` + ``.head``) with cross-entropy.

    The fine-tuning strategy (also a callback of the Trainer) decides the parameter groups
    and their learning-rate multipliers, and which of them train in each epoch. A batch of
    2-d inputs is taken as cached backbone features and goes through the head alone.
    ``runtime`` sets the memory format of the network and its inputs, and the precision of
    validation and test.
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["network", "optimizer", "scheduler", "finetune", "runtime"],
        )
        self.runtime = runtime or Runtime()
        self.network = self.runtime.prepare(network)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.finetune = finetune or FinetuneStrategy()
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        metrics = classification_metrics(num_classes)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.head(x) if x.ndim == 2 else self.network(self.runtime.inputs(x))

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation, in fp32 whatever precision computed them."""
        with self.runtime.inference(self.device.type):
            return self(x).float()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_metrics.update(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss if loss.requires_grad else None  # None: nothing trains (a solved probe)

    def on_train_epoch_end(self) -> None:
        self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.infer(x)
        self.log("val/loss", self.criterion(logits, y), on_epoch=True)
        self.val_metrics.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.infer(x)
        self.log("test/loss", self.criterion(logits, y), on_epoch=True)
        self.test_metrics.update(logits, y)
        self.test_confusion.update(logits, y)

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

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
