"""A pretrained timm backbone with an embedding head, and the losses that train it.

The head projects the pooled features to ``embedding_dim`` (``model.head``: linear or MLP),
then a BatchNorm neck; in eval mode it returns L2-normalised embeddings, compared by cosine
similarity. The training loss is part of the head (``head.loss``): ArcFace, CosFace and
sub-center ArcFace own a matrix of class centres (one per training identity) that is as
new as the projection, so every freezing strategy trains it as the head, at the head's
learning rate, and it is saved with the network. In training mode the head returns the
neck's output before normalisation: the margin and triplet losses normalise it
themselves, and the softmax baseline's linear classifier needs its scale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from transferlab.errors import UserError
from transferlab.models.backbone import feature_dim
from transferlab.models.classifier import Classifier, pretrained_backbone
from transferlab.models.config import ModelConfig
from transferlab.models.head import build_head


class SoftmaxLoss(nn.Module):
    """The baseline: a linear classifier over the training identities on the embedding,
    with cross-entropy."""

    def __init__(self, num_classes: int, embedding_dim: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(embedding_dim, num_classes)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(embeddings), labels)


class TripletLoss(nn.Module):
    """Triplet margin loss on the batch's semi-hard triplets (pytorch-metric-learning's
    miner): an anchor's negatives farther than its positive, but within the margin."""

    def __init__(self, margin: float) -> None:
        super().__init__()
        from pytorch_metric_learning import losses, miners

        self.miner = miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")
        self.loss = losses.TripletMarginLoss(margin=margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


def _arcface(classes: int, dim: int, options: Mapping[str, Any]) -> nn.Module:
    from pytorch_metric_learning.losses import ArcFaceLoss

    return ArcFaceLoss(classes, dim, **options)


def _cosface(classes: int, dim: int, options: Mapping[str, Any]) -> nn.Module:
    from pytorch_metric_learning.losses import CosFaceLoss

    return CosFaceLoss(classes, dim, **options)


def _subcenter_arcface(classes: int, dim: int, options: Mapping[str, Any]) -> nn.Module:
    from pytorch_metric_learning.losses import SubCenterArcFaceLoss

    return SubCenterArcFaceLoss(num_classes=classes, embedding_size=dim, **options)


def _softmax(classes: int, dim: int, options: Mapping[str, Any]) -> nn.Module:
    return SoftmaxLoss(classes, dim)


def _triplet(classes: int, dim: int, options: Mapping[str, Any]) -> nn.Module:
    return TripletLoss(options.get("margin", 0.2))


# task.loss -> (builder, the options of task.* it takes).
LOSSES: dict[str, tuple[Callable[[int, int, Mapping[str, Any]], nn.Module], tuple[str, ...]]] = {
    "arcface": (_arcface, ("margin", "scale")),
    "cosface": (_cosface, ("margin", "scale")),
    "subcenter_arcface": (_subcenter_arcface, ("margin", "scale", "sub_centers")),
    "softmax": (_softmax, ()),
    "triplet": (_triplet, ("margin",)),
}


def loss_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``options`` (margin, scale, sub_centers) loss ``name`` gets: those not None,
    which must be ones it takes (None keeps the loss's own default)."""
    if name not in LOSSES:
        raise UserError(f"unknown task.loss {name!r}: choose from {', '.join(LOSSES)}")
    given = {key: value for key, value in options.items() if value is not None}
    extra = sorted(set(given) - set(LOSSES[name][1]))
    if extra:
        raise UserError(
            f"task.loss={name} takes no {', '.join(f'task.{key}' for key in extra)}: "
            f"set {'it' if len(extra) == 1 else 'them'} to null"
        )
    return given


def build_loss(
    name: str, num_classes: int, embedding_dim: int, options: Mapping[str, Any]
) -> nn.Module:
    """The loss ``name`` for ``num_classes`` training identities (``loss_options``)."""
    return LOSSES[name][0](num_classes, embedding_dim, loss_options(name, options))


class EmbeddingHead(nn.Module):
    """Projection and BatchNorm neck to the embedding, plus the training ``loss``."""

    def __init__(self, neck: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.neck = neck
        self.loss = loss

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embeddings = self.neck(features)
        return embeddings if self.training else F.normalize(embeddings, dim=1)


class EmbeddingNetwork(Classifier):
    """``backbone`` and ``head`` (an ``EmbeddingHead``): images in, embeddings out."""


def build_embedder(
    cfg: Mapping[str, Any] | DictConfig,
    num_classes: int,
    embedding_dim: int | None,
    loss: str,
    loss_options: Mapping[str, Any],
) -> EmbeddingNetwork:
    """The ``model/`` config's backbone with an ``embedding_dim`` head, trained by ``loss``
    over ``num_classes`` training identities. ``embedding_dim`` None: no projection nor
    neck, the embedding is the backbone's pooled features (the untrained baseline with
    ``finetune=linear_probe``: only the loss's own parameters would train)."""
    config = ModelConfig.from_cfg(cfg)
    backbone = pretrained_backbone(config)
    if embedding_dim is None:
        embedding_dim = feature_dim(backbone)
        neck: nn.Module = nn.Identity()
    else:
        projection = build_head(config.head, feature_dim(backbone), embedding_dim)
        neck = nn.Sequential(*projection, nn.BatchNorm1d(embedding_dim))
    head = EmbeddingHead(neck, build_loss(loss, num_classes, embedding_dim, loss_options))
    return EmbeddingNetwork(backbone, head)
