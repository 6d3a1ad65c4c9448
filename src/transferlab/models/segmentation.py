"""A pretrained timm backbone's multi-scale features with a segmentation decoder (smp).

The backbone is the same timm model classification uses, built and loaded by the same
weight sources with the same strict check, so a segmentation run starts from exactly the
packaged (or file, or hub) ImageNet weights, and the freezing strategies find the same
stages. Its feature maps at strides 2-32 (``forward_intermediates``) feed a decoder from
segmentation-models-pytorch; the decoder and the segmentation head are the new ``head``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from transferlab.errors import UserError
from transferlab.models.backbone import create_timm_model, feature_indices
from transferlab.models.config import ModelConfig
from transferlab.models.weights import load_pretrained

# smp decoders expect five feature maps at strides 2, 4, 8, 16 and 32, plus the input.
STRIDES = (2, 4, 8, 16, 32)


def _unet(channels: list[int]) -> tuple[nn.Module, int]:
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder

    widths = (128, 64, 32, 16, 16)
    return UnetDecoder(channels, widths, n_blocks=5), widths[-1]


def _fpn(channels: list[int]) -> tuple[nn.Module, int]:
    from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder

    return FPNDecoder(channels, encoder_depth=5, pyramid_channels=128, segmentation_channels=64), 64


def _deeplabv3plus(channels: list[int]) -> tuple[nn.Module, int]:
    from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3PlusDecoder

    decoder = DeepLabV3PlusDecoder(
        channels,
        encoder_depth=5,
        out_channels=128,
        atrous_rates=(12, 24, 36),
        output_stride=16,
        aspp_separable=True,
        aspp_dropout=0.5,
    )
    return decoder, 128


DECODERS: dict[str, Callable[[list[int]], tuple[nn.Module, int]]] = {
    "unet": _unet,
    "fpn": _fpn,
    "deeplabv3plus": _deeplabv3plus,
}


class SegmentationNet(nn.Module):
    """``backbone`` (timm, pretrained) + ``head`` (decoder and per-pixel classifier)."""

    def __init__(self, backbone: nn.Module, decoder: str, num_classes: int) -> None:
        from segmentation_models_pytorch.base import SegmentationHead

        super().__init__()
        if decoder not in DECODERS:
            raise UserError(f"unknown task.decoder {decoder!r}: choose from {', '.join(DECODERS)}")
        self.indices = feature_indices(backbone, list(STRIDES), "segmentation")
        channels = [3, *(backbone.feature_info[i]["num_chs"] for i in self.indices)]
        backbone.prune_intermediate_layers(self.indices, prune_head=True)
        self.backbone = backbone
        # DeepLabV3+ wants its deepest features at stride 16 (smp dilates the encoder's last
        # stage); here they are upsampled, so the backbone stays the pretrained one as is.
        self.deepest_at_16 = decoder == "deeplabv3plus"
        decoder_module, width = DECODERS[decoder](channels)
        self.head = nn.ModuleDict(
            {
                "decoder": decoder_module,
                "classifier": SegmentationHead(width, num_classes, kernel_size=3),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_intermediates(
            x, indices=self.indices, intermediates_only=True
        )
        if self.deepest_at_16:
            features[-1] = F.interpolate(
                features[-1], size=features[-2].shape[-2:], mode="bilinear", align_corners=False
            )
        logits = self.head["classifier"](self.head["decoder"]([x, *features]))
        if logits.shape[-2:] != x.shape[-2:]:  # FPN and DeepLabV3+ predict at stride 4
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def build_segmenter(
    cfg: Mapping[str, Any] | DictConfig, num_classes: int, decoder: str = "unet"
) -> SegmentationNet:
    """The network of a ``model/`` config with a ``decoder`` for ``num_classes`` classes."""
    config = ModelConfig.from_cfg(cfg)
    backbone = create_timm_model(config, num_classes=0)
    if config.pretrained:
        load_pretrained(backbone, config)
    return SegmentationNet(backbone, decoder, num_classes)
