"""Data: sources, seeded splits, few-shot sampling and transforms from the backbone's data config.

``TransferDataModule`` loads on first use: it brings in torch, and ``data.sources`` is also
read before torch loads (the image-folder checks of ``transferlab.checks``).
"""

from typing import Any

__all__ = ["TransferDataModule"]


def __getattr__(name: str) -> Any:
    if name == "TransferDataModule":
        from transferlab.data.datamodule import TransferDataModule

        return TransferDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
