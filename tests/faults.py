"""Faults injected into real runs through their config (``allowed_targets`` + PYTHONPATH)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl


class SignalOnce(pl.Callback):
    """Sends ``signal`` to its own process before batch ``batch`` of epoch ``epoch``, once:
    the ``marker`` file it leaves keeps a resumed run from stopping again."""

    def __init__(self, epoch: int, batch: int, signal: str, marker: str) -> None:
        self.epoch, self.batch, self.signal, self.marker = epoch, batch, signal, Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        due = (trainer.current_epoch, batch_idx) == (self.epoch, self.batch)
        if due and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), getattr(signal, self.signal))
