"""SIGTERM and Ctrl+C end a run cleanly: KILLED in MLflow, a non-zero exit, a resume hint.

Outside the trainer, the signal raises :class:`Interrupted` at once. Inside ``fit`` and
``test``, Lightning's own SIGTERM handler (which calls ours too) lets the current step
finish and then raises its ``SIGTERMException``, which :func:`trainer_calls` turns into
:class:`Interrupted`; Ctrl+C raises it at once, and Lightning tears down on the way out.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_in_trainer = False
_stopped: Interrupted | None = None


class Interrupted(BaseException):
    """The run was stopped by a signal. Not an ``Exception``: nothing may swallow it."""

    def __init__(self, signum: int) -> None:
        global _stopped
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        _stopped = self

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process the signal ended."""
        return 128 + self.signum


def stopped() -> Interrupted | None:
    """The signal that stopped this process's work, if one did (e.g. for a sweep's end)."""
    return _stopped


def _handler(signum: int, frame: Any) -> None:
    if _in_trainer and signum == signal.SIGTERM:
        return  # Lightning stops at the end of the current step and raises SIGTERMException
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted`."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def trainer_calls() -> Iterator[None]:
    """Around ``trainer.fit`` / ``trainer.test``: a SIGTERM stops after the current step."""
    global _in_trainer
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    _in_trainer = True
    try:
        yield
    except SIGTERMException:
        raise Interrupted(signal.SIGTERM) from None
    finally:
        _in_trainer = False
