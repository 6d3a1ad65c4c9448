"""The Lightning callbacks every run uses: an image counter and a divergence guard, and
per-epoch random state."""

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
