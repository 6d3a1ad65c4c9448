"""Detection networks (timm backbone + torchvision detector) and the COCO mAP metric."""

from __future__ import annotations

import contextlib
import io
import math
from types import SimpleNamespace

import pytest
import torch

from transferlab.errors import UserError
from transferlab.finetune import build_strategy
from transferlab.finetune.stages import backbone_stages
from transferlab.finetune.strategies import apply_bn_policy
from transferlab.models import build_classifier
from transferlab.models.detection import (
    DETECTORS,
    build_detector,
    detection_loss,
    pyramid_extra_strides,
)
from transferlab.tasks.detection_metrics import DetectionScores

LITE0 = {"name": "tf_efficientnet_lite0", "pretrained": False}
CLASSES = 4  # the background and three classes
SIZE = 128


def batch(size: int = SIZE) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    targets = [
        {
            "boxes": torch.tensor([[10.0, 20, 60, 90], [70, 5, 120, 40]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.tensor([[30.0, 30, 100, 110]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def check_detections(detections: list[dict[str, torch.Tensor]], size: int) -> None:
    assert len(detections) == 2
    for found in detections:
        assert set(found) == {"boxes", "scores", "labels"}
        n = len(found["scores"])
        assert found["boxes"].shape == (n, 4) and found["boxes"].dtype == torch.float32
        assert found["labels"].shape == (n,) and found["labels"].dtype == torch.int64
        assert bool(((found["labels"] >= 1) & (found["labels"] < CLASSES)).all())
        assert bool(((found["boxes"] >= 0) & (found["boxes"] <= size)).all())


@pytest.mark.parametrize("detector", ["fcos", "retinanet", "fasterrcnn"])
def test_a_detector_trains_end_to_end_and_predicts_boxes(detector: str) -> None:
    torch.manual_seed(0)
    network = build_detector(LITE0, CLASSES, detector, image_size=SIZE)
    total = sum(p.numel() for p in network.parameters())
    backbone = sum(p.numel() for p in network.backbone.parameters())
    assert sum(p.numel() for p in network.head.parameters()) == total - backbone
    assert len(backbone_stages(network.backbone)) > 1  # timm's group_matcher stages

    images, targets = batch()
    network.train()
    losses = network(images, targets)
    loss = detection_loss(losses)
    assert len(losses) >= 2 and math.isfinite(loss.item())
    loss.backward()
    for name, param in network.named_parameters():
        assert param.grad is not None, f"no gradient reaches {name}"
    assert any(p.grad.abs().sum() > 0 for p in network.backbone.parameters())
    assert any(p.grad.abs().sum() > 0 for p in network.head.parameters())

    network.eval()
    with torch.no_grad():
        check_detections(network(images), SIZE)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # boxes decoded in fp32 all the same
            check_detections(network(images), SIZE)


def test_a_linear_probe_trains_the_head_only_and_keeps_the_batchnorm_statistics() -> None:
    network = build_detector(LITE0, CLASSES, "fcos", image_size=SIZE)
    strategy = build_strategy({"strategy": "linear_probe", "bn": "frozen"})
    strategy.stages = backbone_stages(network.backbone)
    strategy.apply(SimpleNamespace(network=network), epoch=0)
    network.train()
    apply_bn_policy(network.backbone, strategy.bn)
    statistics = {k: v.clone() for k, v in network.backbone.state_dict().items()}
    images, targets = batch()
    detection_loss(network(images, targets)).backward()
    assert all(p.grad is None for p in network.backbone.parameters())
    assert all(p.grad is not None for p in network.head.parameters())
    for name, tensor in network.backbone.state_dict().items():
        assert torch.equal(tensor, statistics[name]), name


@pytest.mark.parametrize(
    ("model", "detector", "size"),
    [("resnet18", "retinanet", SIZE), ("mobilenetv3_large_100", "fasterrcnn", 100)],
)
def test_other_cnn_backbones_and_sizes_that_are_not_a_multiple_of_32(
    model: str, detector: str, size: int
) -> None:
    network = build_detector(
        {"name": model, "pretrained": False}, CLASSES, detector, image_size=size
    )
    images, targets = batch(size)
    targets[1]["boxes"] = targets[1]["boxes"].clamp(max=size - 1)
    network.train()
    assert math.isfinite(detection_loss(network(images, targets)).item())
    network.eval()
    with torch.no_grad():
        check_detections(network(images), size)


def test_the_backbone_starts_from_the_packaged_imagenet_weights() -> None:
    packaged = {"name": "tf_efficientnet_lite0", "pretrained": True, "weights": "package"}
    detector = build_detector(packaged, CLASSES, "fcos", image_size=SIZE)
    reference = build_classifier(packaged, num_classes=10).backbone.state_dict()
    backbone = detector.backbone.state_dict()
    assert len(backbone) > 250
    for name, tensor in backbone.items():
        assert torch.equal(tensor, reference[name]), name


def test_pyramid_levels_above_stride_32_only_where_their_anchors_fit() -> None:
    one_stage, two_stage = DETECTORS["retinanet"], DETECTORS["fasterrcnn"]
    assert pyramid_extra_strides(one_stage, 128) == []
    assert pyramid_extra_strides(one_stage, 256) == [64]
    assert pyramid_extra_strides(one_stage, 800) == [64, 128]
    assert pyramid_extra_strides(two_stage, 256) == []
    assert pyramid_extra_strides(two_stage, 800) == [64]


def test_backbones_without_multiscale_features_and_bad_options_are_one_line_errors() -> None:
    with pytest.raises(UserError, match="strides") as error:
        build_detector({"name": "vit_tiny_patch16_224"}, CLASSES, "fcos", image_size=SIZE)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"score_thres\b.*score_thresh"):
        build_detector(LITE0, CLASSES, "fcos", image_size=SIZE, score_thres=0.1)
    with pytest.raises(UserError, match="unknown detector"):
        build_detector(LITE0, CLASSES, "yolo", image_size=SIZE)


def test_targets_outside_the_batch_contract_are_refused_before_the_loss() -> None:
    network = build_detector(LITE0, CLASSES, "fcos", image_size=SIZE).train()
    images, targets = batch()
    with pytest.raises(ValueError, match="needs the targets"):
        network(images)
    targets[1]["labels"] = torch.tensor([0])  # the background is not a box's class
    with pytest.raises(ValueError, match=r"labels must be in 1\.\.3"):
        network(images, targets)
    images, targets = batch()
    targets[0]["boxes"][1] = torch.tensor([70.0, 40, 120, 5])  # y1 < y0
    with pytest.raises(ValueError, match="width, height > 0"):
        network(images, targets)


# Four 100 px images: ground truth (xyxy, class) and scored predictions (xyxy, class,
# score): hits, misplaced and duplicate boxes, a wrong class, a class (3) without ground
# truth, an image without ground truth.
TRUTH = [
    [([10, 10, 50, 50], 1), ([60, 60, 90, 95], 2)],
    [([5, 5, 30, 40], 1), ([40, 10, 95, 70], 2), ([20, 60, 45, 90], 1)],
    [([30, 30, 70, 80], 2)],
    [],
]
PREDICTED = [
    [([12, 8, 52, 48], 1, 0.9), ([58, 62, 88, 96], 2, 0.75), ([0, 0, 20, 20], 1, 0.3),
     ([60, 60, 90, 95], 1, 0.2)],
    [([6, 4, 31, 41], 1, 0.85), ([42, 12, 93, 68], 2, 0.6), ([22, 58, 44, 92], 1, 0.28),
     ([25, 55, 50, 95], 1, 0.4), ([0, 50, 30, 99], 2, 0.35)],
    [([10, 10, 40, 40], 1, 0.5), ([33, 28, 72, 77], 2, 0.22), ([0, 0, 5, 5], 3, 0.45)],
    [([10, 10, 30, 30], 2, 0.25)],
]  # fmt: skip


def pycocotools_scores() -> tuple[list[float], dict[int, float]]:
    """COCOeval's stats and per-class AP for TRUTH and PREDICTED, as COCO JSON dicts."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box: list[int]) -> list[float]:
        return [box[0], box[1], box[2] - box[0], box[3] - box[1]]

    annotations = []
    for image, boxes in enumerate(TRUTH):
        for box, label in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCOeval takes id 0 for "unmatched"
                    "image_id": image,
                    "category_id": label,
                    "bbox": xywh(box),
                    "area": xywh(box)[2] * xywh(box)[3],
                    "iscrowd": 0,
                }
            )
    truth = COCO()
    truth.dataset = {
        "images": [{"id": i, "width": 100, "height": 100} for i in range(len(TRUTH))],
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
        found = truth.loadRes(
            [
                {"image_id": image, "category_id": label, "bbox": xywh(box), "score": score}
                for image, boxes in enumerate(PREDICTED)
                for box, label, score in boxes
            ]
        )
        evaluation = COCOeval(truth, found, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    per_class = {}
    for k, label in enumerate(evaluation.params.catIds):
        precision = evaluation.eval["precision"][:, :, k, 0, -1]
        if (precision > -1).any():
            per_class[label] = float(precision[precision > -1].mean())
    return list(evaluation.stats), per_class


def split_batches() -> list[tuple[list[dict], list[dict]]]:
    """PREDICTED and TRUTH as two batches of two images (predictions, targets)."""
    batches = []
    for start in (0, 2):
        preds = [
            {
                "boxes": torch.tensor([b for b, _, _ in found], dtype=torch.float32),
                "labels": torch.tensor([c for _, c, _ in found]),
                "scores": torch.tensor([s for _, _, s in found]),
            }
            for found in PREDICTED[start : start + 2]
        ]
        targets = [
            {
                "boxes": torch.tensor([b for b, _ in truth], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor([c for _, c in truth], dtype=torch.int64),
            }
            for truth in TRUTH[start : start + 2]
        ]
        batches.append((preds, targets))
    return batches


def test_map_over_a_split_matches_pycocotools_cocoeval() -> None:
    metric = DetectionScores(num_classes=CLASSES)
    for preds, targets in split_batches():  # accumulated over the split
        metric.update(preds, targets)
    values = metric.compute()
    stats, per_class = pycocotools_scores()
    assert set(values) == {"map", "map_50", "map_75", "mar_100"}
    expected = {"map": stats[0], "map_50": stats[1], "map_75": stats[2], "mar_100": stats[8]}
    for name, value in expected.items():
        assert values[name].item() == pytest.approx(value, abs=1e-6), name
    assert 0 < values["map"].item() < values["map_50"].item() < 1  # a non-trivial example
    ap = metric.per_class_ap()
    assert math.isnan(ap[0]) and math.isnan(ap[3])  # the background; class 3 has no truth
    assert sorted(per_class) == [1, 2]
    for label, value in per_class.items():
        assert ap[label] == pytest.approx(value, abs=1e-6), label
    curves = metric.pr_curves()
    assert sorted(curves) == [1, 2]
    recall, precision = curves[1]
    assert recall.shape == precision.shape == (101,)


def test_report_figures_show_the_boxes_and_a_curve_per_class() -> None:
    from matplotlib import pyplot as plt

    from transferlab.reports.detection import boxes_grid, pr_curves_figure

    names = ["background", "cat", "dog", "bird"]
    metric = DetectionScores(num_classes=CLASSES)
    (preds, targets), _ = split_batches()
    metric.update(preds, targets)
    figure = boxes_grid(torch.rand(2, 3, 100, 100), targets, preds, names, 0.5, "test images")
    boxes = [len(ax.patches) for ax in figure.axes if ax.images]
    assert boxes == [2 + 2, 3 + 2]  # true boxes, then the predictions scoring >= 0.5
    assert "0.5" in figure._suptitle.get_text()
    plt.close(figure)
    figure = pr_curves_figure(metric.pr_curves(), names, "fcos")
    assert [line.get_label().split()[0] for line in figure.axes[0].lines] == ["cat", "dog"]
    plt.close(figure)
