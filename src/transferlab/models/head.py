"""The new classification head placed on the pooled backbone features."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from transferlab.errors import UserError
from transferlab.models.config import HeadConfig

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU}


def linear_head(cfg: HeadConfig, in_features: int, num_classes: int) -> nn.Sequential:
    """Optional Dropout, then Linear."""
    layers: list[nn.Module] = [nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else []
    return nn.Sequential(*layers, nn.Linear(in_features, num_classes))


def mlp_head(cfg: HeadConfig, in_features: int, num_classes: int) -> nn.Sequential:
    """Linear -> activation -> Dropout -> Linear."""
    if cfg.activation not in ACTIVATIONS:
        raise UserError(
            f"unknown model.head.activation '{cfg.activation}': choose {', '.join(ACTIVATIONS)}"
        )
    return nn.Sequential(
        nn.Linear(in_features, cfg.hidden_dim),
        ACTIVATIONS[cfg.activation](),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden_dim, num_classes),
    )


HEADS: dict[str, Callable[[HeadConfig, int, int], nn.Sequential]] = {
    "linear": linear_head,
    "mlp": mlp_head,
}


def build_head(cfg: HeadConfig, in_features: int, num_classes: int) -> nn.Sequential:
    if cfg.type not in HEADS:
        raise UserError(f"unknown model.head.type '{cfg.type}': choose {', '.join(HEADS)}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"model.head.dropout must be in [0, 1), got {cfg.dropout}")
    return HEADS[cfg.type](cfg, in_features, num_classes)
