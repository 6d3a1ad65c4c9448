"""Running the real ``transferlab`` command in tests, and reading its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

BIN = Path(sys.executable).parent
# The cheapest real training run: digits, one epoch of four batches.
SMOKE = ["experiment=smoke", "trainer.max_epochs=1", "trainer.limit_train_batches=4"]


def transferlab(
    *args: str, cwd: Path, timeout: int = 300, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``transferlab *args`` in ``cwd``; ``env``: variables set for it on top of ours."""
    command = [str(BIN / "transferlab"), *args]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **env} if env else None,
    )  # fmt: skip


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a user error prints, checked to be the whole of stderr."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("transferlab: error: ")
    return lines[0]
