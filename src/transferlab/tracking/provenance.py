"""What a run records so it can be re-run: code version, command, packages."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "transferlab",
    "torch",
    "torchvision",
    "timm",
    "pytorch-lightning",
    "torchmetrics",
    "hydra-core",
    "omegaconf",
    "mlflow",
    "numpy",
    # The tasks' own libraries: decoders (segmentation), losses and retrieval (embedding).
    "segmentation-models-pytorch",
    "pytorch-metric-learning",
)


def git_state(path: str | Path) -> dict[str, str]:
    """The commit of the repository at ``path`` and whether its work tree is dirty."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def command_line(overrides: Sequence[str] | None = None) -> str:
    """The command to paste to run this again: ``transferlab train`` and the arguments given
    (``overrides`` instead, when given), shell-quoted and redacted. The same for
    ``python -m transferlab.train``, whose arguments ``transferlab train`` takes as they are."""
    from transferlab.tracking.redact import redact_text

    arguments = sys.argv[1:] if overrides is None else overrides
    return shlex.join(["transferlab", "train", *map(redact_text, arguments)])
