"""SyncBatchNorm for timm backbones under DDP (``trainer.sync_batchnorm``)."""

from __future__ import annotations

from pytorch_lightning.plugins import LayerSync
from torch import nn


class TimmSyncBatchNorm(LayerSync):
    """Every BatchNorm layer as SyncBatchNorm, through timm's converter, which keeps the
    activation of timm's fused BatchNorm + activation layers (torch's converter, Lightning's
    ``sync_batchnorm=True``, drops it)."""

    def apply(self, model: nn.Module) -> nn.Module:
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        # Kept: without a process group (rank 0 after the test) SyncBatchNorm computes as
        # BatchNorm, and its state dict has the same keys.
        return model
