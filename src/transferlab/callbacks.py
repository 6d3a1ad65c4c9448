"""The Lightning callbacks every run uses: an image counter and a divergence guard,
per-epoch random state, and the learning rates a person reads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from transferlab.errors import UserError


def batch_size(batch: Mapping[str, Any]) -> int:
    """The number of samples in a dict batch (the length of its first entry)."""
    return len(next(iter(batch.values())))


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite."""


class TrainingWatch(pl.Callback):
    """Counts the training images seen and stops a run whose loss turns NaN or infinite.

    Images per second is ``images`` / fit time. The loss check is folded into a flag on
    the loss's device and read every ``every_n_steps`` steps and at each epoch end, so it
    adds no per-step host sync on an accelerator.
    """

    def __init__(self, every_n_steps: int = 20) -> None:
        self.every_n_steps = every_n_steps
        self.images = 0
        self._bad: torch.Tensor | None = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self.images += batch_size(batch)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        bad = ~torch.isfinite(loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad
        if (batch_idx + 1) % self.every_n_steps == 0:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def _check(self, trainer: pl.Trainer) -> None:
        if self._bad is not None and bool(self._bad):
            raise TrainingDiverged(
                f"the training loss became NaN or infinite by epoch {trainer.current_epoch} "
                f"(step {trainer.global_step}): lower optimizer.lr, or clip gradients with "
                "trainer.gradient_clip_val=1.0"
            )
        self._bad = None


class EpochSeed(pl.Callback):
    """Seeds Python's, NumPy's and torch's generators from (seed, epoch) at each epoch start.

    An epoch's random draws (dropout, augmentation, the data loader's worker seeds) then
    depend on the seed and the epoch number only, not on what ran before: a run resumed
    from a checkpoint continues exactly as the uninterrupted run would have.
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl.seed_everything(
            (self.seed * 1_000_003 + trainer.current_epoch) % 2**32, workers=True, verbose=False
        )


class LearningRates(pl.Callback):
    """Logs, at each epoch's first batch, one learning rate per distinct rate that trains:
    ``lr/head``, and ``lr/backbone`` (``lr/backbone.<stage>`` per stage only where the
    stages' rates differ, as with layer decay). Groups whose parameters are all frozen are
    left out, and a group's ``_no_decay`` twin (the same rate) is not repeated. Logged with
    the epoch, so MLflow charts them against it.
    """

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx != 0 or not trainer.loggers:
            return
        rates = {
            f"lr/{name}": value
            for optimizer in trainer.optimizers
            for name, value in distinct_rates(optimizer.param_groups).items()
        }
        if rates:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {**rates, "epoch": trainer.current_epoch}, step=trainer.global_step
                )


def distinct_rates(groups: list[dict[str, Any]]) -> dict[str, float]:
    """``{name: lr}`` of the groups with a trainable parameter; the backbone's stages as one
    ``backbone`` when they all learn at one rate."""
    trainable: dict[str, float] = {}
    for index, group in enumerate(groups):
        if any(p.requires_grad for p in group["params"]):
            name = str(group.get("name", f"group{index}")).removesuffix("_no_decay")
            trainable.setdefault(name, float(group["lr"]))
    stages = {name: lr for name, lr in trainable.items() if name.startswith("backbone.")}
    if stages and len(set(stages.values())) == 1:
        trainable = {name: lr for name, lr in trainable.items() if name not in stages}
        trainable["backbone"] = next(iter(stages.values()))
    return trainable
