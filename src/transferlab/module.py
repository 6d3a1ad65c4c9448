"""The LightningModule: any task's network, loss, metrics and optimizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch import nn

from transferlab.finetune import FinetuneStrategy, build_strategy
from transferlab.optim import OptimizerFactory, SchedulerFactory, apply_lr_mult
from transferlab.runtime import Runtime
from transferlab.tasks import Step, Task, build_task

if TYPE_CHECKING:
    from torchmetrics import Metric, MetricCollection


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


def in_fp32(outputs: Any) -> Any:
    """``outputs`` with every floating-point tensor in fp32, in lists, tuples and dicts too
    (a detector's per-image boxes and scores); other values as they are."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, Mapping):
        return {key: in_fp32(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(in_fp32(value) for value in outputs)
    return outputs


class EpochMeans(nn.Module):
    """The epoch means of a split's loss and its terms, weighted by batch size (as
    Lightning's epoch-level logging weights them), synced over DDP ranks when computed."""

    def __init__(self) -> None:
        super().__init__()
        self.means = nn.ModuleDict()

    def update(self, values: Mapping[str, torch.Tensor], size: int) -> None:
        from torchmetrics import MeanMetric

        for name, value in values.items():
            if name not in self.means:
                self.means[name] = MeanMetric().to(value.device)
            self.means[name].update(value.detach().float(), weight=size)

    def compute(self, epoch_suffix: bool = False) -> dict[str, torch.Tensor]:
        """The means (the loss as ``loss_epoch`` with ``epoch_suffix``), then reset."""
        values = {}
        for name, mean in self.means.items():
            if mean.update_called:
                key = "loss_epoch" if epoch_suffix and name == "loss" else name
                values[key] = mean.compute()
            mean.reset()
        return values


class TransferModule(pl.LightningModule):
    """Trains ``network`` (``.backbone`` + ``.head``) with the task's loss and metrics.

    The task (classification by default) gives the loss, the metrics, the batch's target
    key and the test state its report needs; its ``training_step`` and ``evaluation_step``
    hooks turn a batch into its loss and the outputs the metrics take (by default the
    network on the images; a detector also takes the targets in training). The fine-tuning
    strategy (also a callback of the Trainer) decides the parameter groups and their
    learning-rate multipliers, and which of them train in each epoch. Batches are dicts:
    ``image``, or ``features`` when the feature cache serves the head alone, plus the
    target. ``runtime`` sets the memory format of the network and its inputs, and the
    precision of validation and test.
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
        train_metrics = self.task.train_metrics(num_classes)
        self.train_metrics = None if train_metrics is None else train_metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.test_state = nn.ModuleDict(self.task.test_state(num_classes))
        self.train_losses, self.val_losses, self.test_losses = (EpochMeans() for _ in range(3))

    def forward(self, x: torch.Tensor, *targets: Any) -> Any:
        """The network on images ``x`` in the runtime's memory format; ``targets``: what a
        network takes besides the images (a detector's boxes, in training)."""
        return self.network(self.runtime.inputs(x), *targets)

    def outputs(self, batch: Mapping[str, Any]) -> Any:
        """The network's outputs for a batch: cached features go through the head alone."""
        if "features" in batch:
            return self.network.head(batch["features"])
        return self(batch["image"])

    def infer(self, batch: Mapping[str, Any]) -> Any:
        """Outputs for evaluation, in fp32 whatever precision computed them."""
        with self.runtime.inference(self.device.type):
            return in_fp32(self.outputs(batch))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int):
        step = self.task.training_step(self, batch)
        self.record("train", step, batch, self.train_metrics)
        loss = step.loss
        return loss if loss.requires_grad else None  # None: nothing trains (a solved probe)

    def on_train_epoch_end(self) -> None:
        self.log_epoch("train", self.train_metrics)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self.record("val", self.task.evaluation_step(self, batch), batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self.log_epoch("val", self.val_metrics, prog_bar=True)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        step = self.task.evaluation_step(self, batch)
        self.record("test", step, batch, self.test_metrics, *self.test_state.values())

    def record(
        self, split: str, step: Step, batch: Mapping[str, Any], *metrics: Metric | None
    ) -> None:
        """Log a training step's loss; add ``step``'s loss and terms to the split's epoch
        means, and update ``metrics`` with its outputs."""
        size = len(batch[self.task.target])
        losses = {"loss": step.loss} if step.loss is not None else {}
        getattr(self, f"{split}_losses").update({**losses, **step.terms}, size)
        if split == "train" and step.loss is not None:
            self.log("train/loss_step", step.loss, prog_bar=True, batch_size=size)
        if step.outputs is None:
            return
        target = batch[self.task.target]
        with metric_updates(self.device):
            for metric in metrics:
                if metric is not None:
                    metric.update(step.outputs, target)

    def log_epoch(self, split: str, metrics: MetricCollection | None, reset: bool = True,
                  **options: Any) -> None:  # fmt: skip
        """Log the split's epoch: its loss means and ``metrics``, each computed over every
        rank (torchmetrics syncs on compute: every rank runs this hook, in the same order).

        Not Lightning's ``sync_dist``: its progress bar computes those on rank 0 alone, in
        an earlier hook than the other ranks, which deadlocks DDP.
        """
        values = getattr(self, f"{split}_losses").compute(epoch_suffix=split == "train")
        values = {f"{split}/{name}": value for name, value in values.items()}
        if metrics is not None and any(m.update_called for m in metrics.values()):
            values.update(metrics.compute())
            if reset:
                metrics.reset()
        self.log_dict(values, **options)

    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()
        for metric in self.test_state.values():
            metric.reset()

    def on_test_epoch_end(self) -> None:
        # Not reset here: the task's report may read what the test metrics accumulated.
        self.log_epoch("test", self.test_metrics, reset=False)
        if self.trainer.world_size > 1:  # the report runs on rank 0 alone, after the others
            from transferlab.distributed import keep_synced_states

            keep_synced_states([*self.test_metrics.values(), *self.test_state.values()])

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
