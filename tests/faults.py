"""Faults injected into real runs through their config (``allowed_targets`` + PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import socket
import time
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


class StopServer(pl.Callback):
    """Kills the tracking server (SIGKILL to its process group ``pgid``) at the start of
    epoch ``epoch``, and waits until ``port`` of 127.0.0.1 refuses connections: the run
    goes on without its server."""

    def __init__(self, epoch: int, pgid: int, port: int) -> None:
        self.epoch, self.pgid, self.port = epoch, pgid, port

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch != self.epoch:
            return
        os.killpg(self.pgid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the server on port {self.port} still answers")


class FailOnRank(pl.Callback):
    """Raises on DDP rank ``rank`` before its training batch ``batch``: a worker that dies
    in the middle of an epoch."""

    def __init__(self, rank: int, batch: int) -> None:
        self.rank, self.batch = rank, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.batch:
            raise RuntimeError(f"injected failure on rank {self.rank}")
