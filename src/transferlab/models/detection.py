"""A pretrained timm backbone's multi-scale features with a torchvision detector on top.

The backbone is the same timm model classification uses, built and loaded by the same
weight sources with the same strict check (before its unused top is pruned, as for
segmentation), so the freezing strategies find the same ``group_matcher`` stages and the
BatchNorm policy reaches its BatchNorm layers. timm's ``features_only=True`` would not do:
it builds another class (``EfficientNetFeatures``, ``FeatureListNet``) without
``group_matcher`` and with other state-dict keys. Everything new is ``head``: a feature
pyramid (torchvision's FPN) and torchvision's FCOS, RetinaNet or Faster R-CNN minus its
backbone and its transform.

Pyramid levels: the backbone's maps at strides 8-32 (FCOS, RetinaNet) or 4-32 (Faster
R-CNN), plus the extra levels those detectors put above stride 32 (P6, P7 by stride-2
convs; Faster R-CNN's max-pooled "pool" level for the RPN) while their base anchor fits in
the image: anchors stay tied to the stride (4x stride for FCOS's smallest regression range
and RetinaNet's anchors, 8x for Faster R-CNN's), as in the papers, so at 128 px the
pyramid is P3-P5 (P2-P5 for Faster R-CNN) and at 512 px P3-P7.

Images are not resized nor normalised again: the data module already did both, so
torchvision's ``GeneralizedRCNNTransform`` is left out; the batch is only padded at the
bottom right to a multiple of 32 when it is not one (the anchors' strides are computed
from the padded size), and boxes are clipped to the unpadded image.

Labels are 1..C with 0 the background in both directions; FCOS and RetinaNet classify with
sigmoids and get C-1 logits (no background channel), Faster R-CNN a softmax over C.
BatchNorm is left as timm builds it (no ``FrozenBatchNorm2d``): the project's BatchNorm
policy (``finetune.bn``) applies to ``backbone``; the head has GroupNorm or no norm, so it
does not depend on the batch size.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
)

from transferlab.errors import UserError
from transferlab.models.backbone import create_timm_model, feature_indices
from transferlab.models.config import ModelConfig
from transferlab.models.weights import load_pretrained

BACKBONE_STRIDES = (4, 8, 16, 32)
SIZE_DIVISIBLE = 32  # the deepest backbone stride: every level's grid divides the image
FPN_CHANNELS = 128
GROUP_NORM_GROUPS = 32  # FCOS's and RetinaNet's heads use GroupNorm(32, channels)

Targets = list[dict[str, Tensor]]
Detections = list[dict[str, Tensor]]


class Pyramid(FeaturePyramidNetwork):
    """torchvision's FPN over a list of backbone maps, levels named ``p<log2 stride>``."""

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        channels: int,
        extra_blocks: ExtraFPNBlock | None,
    ) -> None:
        super().__init__(in_channels, channels, extra_blocks=extra_blocks)
        self.names = [level_name(stride) for stride in strides]
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> OrderedDict[str, Tensor]:  # type: ignore[override]
        return super().forward(OrderedDict(zip(self.names, features, strict=True)))


class ExtraLevels(ExtraFPNBlock):
    """P6, P7, ... by stride-2 3x3 convs from P5: torchvision's ``LastLevelP6P7`` for any
    number of levels (a ReLU before each but the first)."""

    def __init__(self, channels: int, strides: list[int]) -> None:
        super().__init__()
        self.names = [level_name(stride) for stride in strides]
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1) for _ in strides
        )
        for conv in self.convs:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(
        self, results: list[Tensor], x: list[Tensor], names: list[str]
    ) -> tuple[list[Tensor], list[str]]:
        level = results[-1]
        for i, conv in enumerate(self.convs):
            level = conv(level if i == 0 else F.relu(level))
            results.append(level)
        return results, [*names, *self.names]


@dataclass(frozen=True)
class DetectorKind:
    """How a torchvision detector is laid out on the pyramid, and its builder."""

    build: Callable[[Pyramid, list[int], int, dict[str, Any]], nn.Module]
    smallest_stride: int
    extra_strides: tuple[int, ...]  # levels above the backbone's, kept while they fit
    anchor_per_stride: int  # base anchor size / stride: the fit rule for extra levels
    background_logit: bool  # softmax over background + classes, or one sigmoid per class
    constructor: type[nn.Module]


DETECTORS: dict[str, DetectorKind] = {}
# What build_detector itself sets: not a user option.
_RESERVED = {
    "self",
    "backbone",
    "num_classes",
    "min_size",
    "max_size",
    "image_mean",
    "image_std",
    "anchor_generator",
    "head",
    "rpn_anchor_generator",
    "rpn_head",
    "box_roi_pool",
    "box_head",
    "box_predictor",
    "kwargs",
}


def detector_kind(name: str) -> DetectorKind:
    if name not in DETECTORS:
        raise UserError(f"unknown detector {name!r}: choose from {', '.join(DETECTORS)}")
    return DETECTORS[name]


def register_detector(
    name: str,
    constructor: type[nn.Module],
    *,
    smallest_stride: int,
    extra_strides: tuple[int, ...],
    anchor_per_stride: int,
    background_logit: bool,
) -> Callable:
    """Decorator: make a builder available as ``detector=<name>``."""

    def register(build: Callable) -> Callable:
        DETECTORS[name] = DetectorKind(
            build, smallest_stride, extra_strides, anchor_per_stride, background_logit, constructor
        )
        return build

    return register


@register_detector(
    "fcos",
    FCOS,
    smallest_stride=8,
    extra_strides=(64, 128),
    anchor_per_stride=4,
    background_logit=False,
)
def _fcos(pyramid: Pyramid, strides: list[int], logits: int, options: dict[str, Any]) -> FCOS:
    # One stride-sized anchor per location; a location learns boxes whose largest distance
    # to it is in [4, 8) x stride (torchvision's FCOS). Score threshold 0.05 (torchvision:
    # 0.2), as the other two, so mAP sees the low-score tail.
    anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * len(strides))
    return FCOS(pyramid, logits, anchor_generator=anchors, **{"score_thresh": 0.05, **options})


@register_detector(
    "retinanet",
    RetinaNet,
    smallest_stride=8,
    extra_strides=(64, 128),
    anchor_per_stride=4,
    background_logit=False,
)
def _retinanet(
    pyramid: Pyramid, strides: list[int], logits: int, options: dict[str, Any]
) -> RetinaNet:
    # The paper's anchors: 4 x stride at 3 scales (2^0, 2^1/3, 2^2/3) and 3 aspect ratios;
    # the head with GroupNorm as torchvision's RetinaNet v2 (and FCOS).
    sizes = tuple((4 * s, int(4 * s * 2 ** (1 / 3)), int(4 * s * 2 ** (2 / 3))) for s in strides)
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(strides))
    head = RetinaNetHead(
        pyramid.out_channels,
        anchors.num_anchors_per_location()[0],
        logits,
        norm_layer=partial(nn.GroupNorm, GROUP_NORM_GROUPS),
    )
    options = {"detections_per_img": 100, **options}  # COCO's maxDets (torchvision: 300)
    return RetinaNet(pyramid, logits, anchor_generator=anchors, head=head, **options)


@register_detector(
    "fasterrcnn",
    FasterRCNN,
    smallest_stride=4,
    extra_strides=(64,),
    anchor_per_stride=8,
    background_logit=True,
)
def _fasterrcnn(
    pyramid: Pyramid, strides: list[int], logits: int, options: dict[str, Any]
) -> FasterRCNN:
    # torchvision's FPN layout: RPN anchors 8 x stride, 3 aspect ratios, on every level;
    # RoIAlign (7x7) on the backbone's levels only (not the max-pooled one).
    anchors = AnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
    pool = MultiScaleRoIAlign(pyramid.names, output_size=7, sampling_ratio=2)
    return FasterRCNN(pyramid, logits, rpn_anchor_generator=anchors, box_roi_pool=pool, **options)


class DetectionNet(nn.Module):
    """``backbone`` (timm, pretrained) + ``head`` (``fpn`` and torchvision's ``detector``).

    ``forward(images, targets)`` in train mode returns the loss dict (sum it with
    :func:`detection_loss`); in eval mode, per image ``{"boxes", "scores", "labels"}``
    (boxes xyxy in pixels of the input, labels 1..C-1; targets, if given, are ignored).
    Loss and post-processing run in fp32
    under autocast, so boxes are never rounded to bf16.
    """

    def __init__(
        self,
        backbone: nn.Module,
        detector: str,
        num_classes: int,
        image_size: int,
        fpn_channels: int = FPN_CHANNELS,
        **options: Any,
    ) -> None:
        super().__init__()
        kind = detector_kind(detector)
        if num_classes < 2:
            raise UserError(
                f"detection needs the background and at least one class, got {num_classes} "
                "class name(s)"
            )
        _check_options(detector, kind, options)
        if fpn_channels < 1 or (
            not kind.background_logit and fpn_channels % GROUP_NORM_GROUPS != 0
        ):
            raise UserError(
                f"fpn_channels={fpn_channels} must be a positive multiple of "
                f"{GROUP_NORM_GROUPS} (the heads' GroupNorm groups)"
            )
        strides = [s for s in BACKBONE_STRIDES if s >= kind.smallest_stride]
        self.indices = feature_indices(backbone, strides, "detection")
        backbone.prune_intermediate_layers(self.indices, prune_head=True)
        self.backbone = backbone
        extra = pyramid_extra_strides(kind, image_size)
        channels = [backbone.feature_info[i]["num_chs"] for i in self.indices]
        if kind.constructor is FasterRCNN:
            extra_blocks: ExtraFPNBlock | None = LastLevelMaxPool() if extra else None
        else:
            extra_blocks = ExtraLevels(fpn_channels, extra) if extra else None
        fpn = Pyramid(channels, strides, fpn_channels, extra_blocks)
        self.strides = [*strides, *extra]
        logits = num_classes if kind.background_logit else num_classes - 1
        model = kind.build(fpn, self.strides, logits, options)
        # torchvision's detector without its backbone (the FPN is beside it, the timm model
        # is self.backbone) nor its transform (images come resized and normalised).
        del model.backbone, model.transform
        self.head = nn.ModuleDict({"fpn": fpn, "detector": model})
        self.detector = detector
        self.num_classes = num_classes
        self.image_size = image_size
        self.label_offset = 0 if kind.background_logit else 1

    def forward(
        self, images: Tensor, targets: Targets | None = None
    ) -> dict[str, Tensor] | Detections:
        if self.training:
            if targets is None:
                raise ValueError("a detector in train mode needs the targets: net(images, targets)")
            check_targets(targets, len(images), self.num_classes)
            targets = [{**t, "labels": t["labels"] - self.label_offset} for t in targets]
        else:
            targets = None
        height, width = images.shape[-2:]
        image_list = ImageList(
            pad_to_multiple(images, SIZE_DIVISIBLE), [(height, width)] * len(images)
        )
        features = self.backbone.forward_intermediates(
            image_list.tensors, indices=self.indices, intermediates_only=True
        )
        levels = self.head["fpn"](features)
        model = self.head["detector"]
        if isinstance(model, FasterRCNN):
            return _two_stage(model, image_list, levels, targets)
        outputs = _one_stage(model, image_list, list(levels.values()), targets)
        if targets is not None:
            return outputs
        for detections in outputs:
            detections["labels"] = detections["labels"] + self.label_offset
        return outputs


def _one_stage(
    model: FCOS | RetinaNet, images: ImageList, levels: list[Tensor], targets: Targets | None
) -> dict[str, Tensor] | Detections:
    """torchvision's FCOS / RetinaNet forward after the backbone."""
    outputs = model.head(levels)
    with _fp32(levels[0].device.type):
        outputs = {k: v.float() for k, v in outputs.items()}
        levels = [level.float() for level in levels]  # the anchors take the levels' dtype
        anchors = model.anchor_generator(images, levels)
        per_location = model.anchor_generator.num_anchors_per_location()[0]
        per_level = [level.shape[-2] * level.shape[-1] * per_location for level in levels]
        if targets is not None:
            if isinstance(model, FCOS):
                return model.compute_loss(targets, outputs, anchors, per_level)
            return model.compute_loss(targets, outputs, anchors)
        split = {k: list(v.split(per_level, dim=1)) for k, v in outputs.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        return model.postprocess_detections(split, split_anchors, images.image_sizes)


def _two_stage(
    model: FasterRCNN,
    images: ImageList,
    levels: OrderedDict[str, Tensor],
    targets: Targets | None,
) -> dict[str, Tensor] | Detections:
    """torchvision's Faster R-CNN forward after the backbone (RPN and RoI heads in fp32)."""
    with _fp32(images.tensors.device.type):
        levels = OrderedDict((k, v.float()) for k, v in levels.items())
        proposals, proposal_losses = model.rpn(images, levels, targets)
        detections, detector_losses = model.roi_heads(
            levels, proposals, images.image_sizes, targets
        )
    if targets is not None:
        return {**detector_losses, **proposal_losses}
    return detections


def _fp32(device_type: str) -> torch.autocast:
    return torch.autocast(device_type, enabled=False)


def detection_loss(losses: Mapping[str, Tensor]) -> Tensor:
    """The training loss: the sum of a detector's loss terms (classification, boxes, ...)."""
    return torch.stack(list(losses.values())).sum()


def check_targets(targets: Targets, batch_size: int, num_classes: int) -> None:
    """Raise ValueError unless ``targets`` follow the batch contract (a data bug, not a user's)."""
    if len(targets) != batch_size:
        raise ValueError(f"{len(targets)} targets for {batch_size} images")
    for i, target in enumerate(targets):
        boxes, labels = target["boxes"], target["labels"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(
                f"target {i}: boxes must be [N, 4] and labels [N], got {tuple(boxes.shape)} "
                f"and {tuple(labels.shape)}"
            )
    boxes = torch.cat([t["boxes"] for t in targets])
    labels = torch.cat([t["labels"] for t in targets])
    degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
    outside = (labels < 1) | (labels >= num_classes)
    if bool((degenerate.any() | outside.any()).item()):
        if degenerate.any():
            raise ValueError(
                f"boxes must be xyxy with width, height > 0: {boxes[degenerate][0].tolist()}"
            )
        raise ValueError(
            f"labels must be in 1..{num_classes - 1} (0 is the background): {labels[outside][0].item()}"
        )


def pad_to_multiple(images: Tensor, multiple: int) -> Tensor:
    """``images`` zero-padded at the bottom and right to a multiple of ``multiple``."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h))


def level_name(stride: int) -> str:
    return f"p{int(math.log2(stride))}"


def pyramid_extra_strides(kind: DetectorKind, image_size: int) -> list[int]:
    """The levels above stride 32 whose base anchor (``anchor_per_stride`` x stride) fits in
    an ``image_size`` image; a level that does not fit would only see the padding."""
    extra = []
    for stride in kind.extra_strides:
        if kind.anchor_per_stride * stride > image_size:
            break
        extra.append(stride)
    return extra


def _check_options(detector: str, kind: DetectorKind, options: Mapping[str, Any]) -> None:
    known = set(inspect.signature(kind.constructor.__init__).parameters) - _RESERVED
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(
            f"unknown option(s) {', '.join(unknown)} for detector={detector}: choose from "
            f"fpn_channels, {', '.join(sorted(known))}"
        )


def build_detector(
    cfg: Mapping[str, Any] | DictConfig,
    num_classes: int,
    detector: str = "fcos",
    *,
    image_size: int,
    **options: Any,
) -> DetectionNet:
    """The network of a ``model/`` config with a ``detector`` for ``num_classes`` classes
    (the background included) on ``image_size`` images.

    ``options``: ``fpn_channels`` (default 128) and the torchvision detector's own
    arguments (``score_thresh``, ``nms_thresh``, ``detections_per_img``, ``rpn_*``,
    ``box_*``, ...).
    """
    config = ModelConfig.from_cfg(cfg)
    detector_kind(detector)  # before building the backbone
    backbone = create_timm_model(config, num_classes=0)
    if config.pretrained:
        load_pretrained(backbone, config)
    return DetectionNet(backbone, detector, num_classes, image_size, **options)
