"""Fine-tuning strategies as Lightning callbacks (``finetune=<name>``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from torch import nn

from transferlab.errors import UserError

BN_POLICIES = ("eval", "train")


def set_requires_grad(module: nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(trainable)


def is_frozen(module: nn.Module) -> bool:
    """A module is frozen when it has parameters and none of them train."""
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def apply_bn_policy(module: nn.Module, policy: str) -> None:
    """Put BatchNorm layers in eval mode where they are frozen, or everywhere for ``eval``.

    A BatchNorm layer in eval mode normalises with its pretrained running statistics and
    leaves them unchanged; its affine parameters still train unless frozen.
    """
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and (
            policy == "eval" or is_frozen(layer)
        ):
            layer.eval()


class FinetuneStrategy(pl.Callback):
    """Base strategy: decides which parts of ``pl_module.network`` train.

    Subclasses set ``freeze_backbone``. Freezing happens in ``setup`` (before the optimizer
    is built, so frozen parameters get no optimizer state) and the BatchNorm policy is
    re-applied at every training epoch start, after Lightning puts the model in train mode.
    """

    name = "base"
    freeze_backbone = False

    def __init__(self, backbone_lr_mult: float = 1.0, bn: str = "eval") -> None:
        if bn not in BN_POLICIES:
            raise UserError(f"finetune.bn={bn!r} is not one of {', '.join(BN_POLICIES)}")
        if backbone_lr_mult < 0:
            raise UserError(f"finetune.backbone_lr_mult={backbone_lr_mult} must be >= 0")
        self.backbone_lr_mult = backbone_lr_mult
        self.bn = bn

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        set_requires_grad(pl_module.network.backbone, not self.freeze_backbone)
        set_requires_grad(pl_module.network.head, True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        apply_bn_policy(pl_module.network, self.bn)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bn": self.bn, "backbone_lr_mult": self.backbone_lr_mult}


class Full(FinetuneStrategy):
    """Everything trains; the backbone at ``lr * backbone_lr_mult``."""

    name = "full"


class LinearProbe(FinetuneStrategy):
    """The backbone is frozen, BatchNorm statistics included; only the head trains."""

    name = "linear_probe"
    freeze_backbone = True


STRATEGIES: dict[str, type[FinetuneStrategy]] = {s.name: s for s in (Full, LinearProbe)}


def build_strategy(cfg: Mapping[str, Any]) -> FinetuneStrategy:
    """The strategy named by ``cfg['strategy']``, built from the rest of ``cfg``."""
    options = dict(cfg)
    name = options.pop("strategy", None)
    if name not in STRATEGIES:
        raise UserError(
            f"unknown finetune strategy {name!r}: choose one of {', '.join(STRATEGIES)}"
        )
    try:
        return STRATEGIES[name](**options)
    except TypeError as err:
        raise UserError(f"finetune={name}: {err}") from None
