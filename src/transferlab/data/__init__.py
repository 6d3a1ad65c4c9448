"""Data: sources, seeded splits, few-shot sampling and transforms from the backbone's data config."""

from transferlab.data.datamodule import TransferDataModule

__all__ = ["TransferDataModule"]
