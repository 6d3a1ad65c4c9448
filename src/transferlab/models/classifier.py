"""A timm backbone (classifier removed) plus a new head sized for the data's classes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm
import torch
from omegaconf import DictConfig
from timm.data import resolve_data_config, resolve_model_data_config
from torch import nn

from transferlab.models.backbone import check_model_name, create_backbone, feature_dim
from transferlab.models.config import ModelConfig
from transferlab.models.head import build_head
from transferlab.models.weights import load_pretrained


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_features = feature_dim(backbone)
        self.data_config: dict[str, Any] = dict(resolve_model_data_config(backbone))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, before the head."""
        return self.backbone(x)


def build_classifier(cfg: Mapping[str, Any] | DictConfig, num_classes: int) -> Classifier:
    """Build the network described by a ``model/`` config for ``num_classes`` classes."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    config = ModelConfig.from_cfg(cfg)
    backbone = pretrained_backbone(config)
    return Classifier(backbone, build_head(config.head, feature_dim(backbone), num_classes))


def pretrained_backbone(config: ModelConfig) -> nn.Module:
    """The config's timm backbone (pooled features out), with its weights when pretrained."""
    backbone = create_backbone(config)
    if config.pretrained:
        load_pretrained(backbone, config)
    return backbone


def model_data_config(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The preprocessing (input size, mean, std, interpolation, crop) the backbone expects.

    Read from timm's pretrained config, without building the network, so the data can be
    prepared (and the number of classes known) before the model is built.
    """
    config = ModelConfig.from_cfg(cfg)
    check_model_name(config.name)
    pretrained_cfg = timm.get_pretrained_cfg(config.name)
    if pretrained_cfg is None:
        return dict(resolve_model_data_config(create_backbone(config)))
    return dict(resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict()))
