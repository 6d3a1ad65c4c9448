"""COCO box mAP over a whole split, for ``task=detection``.

torchmetrics' ``MeanAveragePrecision`` with the faster-coco-eval backend (a C++ port of
pycocotools' COCOeval, with the same numbers: ``tests/test_detection_models.py`` checks it
against pycocotools itself). It keeps every prediction and target of the split and
evaluates them once, in ``compute``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

SCORES = ("map", "map_50", "map_75", "mar_100")
PR_IOU = 0.5  # the IoU threshold of the precision-recall curves

# faster-coco-eval logs COCOeval's 12-line summary at INFO for every split evaluated.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)


class DetectionScores(MeanAveragePrecision):
    """``map`` (AP at IoU .50:.95), ``map_50``, ``map_75`` and ``mar_100`` (recall with 100
    detections per image), all classes averaged; per-class AP and precision-recall curves
    for the report (:meth:`per_class_ap`, :meth:`pr_curves`).

    ``update(preds, targets)``: per image, ``{"boxes": [N, 4] xyxy, "scores": [N],
    "labels": [N]}`` and ``{"boxes", "labels"}`` (the batch's ``target``), labels 1..C,
    with ``iscrowd`` where the target has it: a detection matching a crowd region is
    neither a hit nor a false positive, and crowd regions need not be found (COCO's rule).
    A class without ground truth in the split is left out of the means (COCO's rule).
    """

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(
            box_format="xyxy",
            iou_type="bbox",
            class_metrics=True,
            extended_summary=True,
            backend="faster_coco_eval",
            **kwargs,
        )
        self.num_classes = int(num_classes)
        self._summary: dict[str, Any] = {}

    def update(
        self, preds: Sequence[dict[str, Tensor]], target: Sequence[dict[str, Tensor]]
    ) -> None:
        super().update(
            [{k: p[k].detach() for k in ("boxes", "scores", "labels")} for p in preds],
            [{k: t[k] for k in ("boxes", "labels", "iscrowd") if k in t} for t in target],
        )

    def compute(self) -> dict[str, Tensor]:
        self._summary = super().compute()
        return {name: self._summary[name] for name in SCORES}

    def reset(self) -> None:
        super().reset()
        self._summary = {}

    def summary(self) -> dict[str, Any]:
        """torchmetrics' whole result (``compute`` runs first if it has not)."""
        if not self._summary:
            self.compute()
        return self._summary

    def per_class_ap(self) -> list[float]:
        """AP at IoU .50:.95 of each class index 0..C-1; NaN where the split has no ground
        truth of the class (the background, index 0, always)."""
        summary = self.summary()
        values = [math.nan] * self.num_classes
        for label, ap in zip(
            summary["classes"].reshape(-1).tolist(),
            summary["map_per_class"].reshape(-1).tolist(),
            strict=True,
        ):
            if 0 <= label < self.num_classes and ap >= 0:
                values[label] = ap
        return values

    def per_class_boxes(self) -> list[int]:
        """The number of ground-truth boxes of each class index 0..C-1 the split had (crowd
        regions not counted)."""
        counts = [0] * self.num_classes
        for labels, crowds in zip(self.groundtruth_labels, self.groundtruth_crowds, strict=True):
            for label in labels[crowds == 0].tolist():
                if 0 <= label < self.num_classes:
                    counts[label] += 1
        return counts

    def pr_curves(self) -> dict[int, tuple[Tensor, Tensor]]:
        """Per class with ground truth: (recall, precision) at IoU 0.5 over COCO's 101 recall
        points, all box areas, 100 detections per image; precision 0 past the last recall."""
        summary = self.summary()
        precision = summary["precision"]  # [IoU thresholds, recall points, classes, areas, maxDets]
        iou = min(
            range(len(self.iou_thresholds)), key=lambda i: abs(self.iou_thresholds[i] - PR_IOU)
        )
        recall_points = torch.tensor(self.rec_thresholds, dtype=torch.float64)
        labels = summary["classes"].reshape(-1).tolist()
        curves = {}
        for k, label in enumerate(labels):
            curve = precision[iou, :, k, 0, -1].double()
            if bool((curve < 0).all()):
                continue  # no ground truth of this class
            curves[int(label)] = (recall_points, curve.clamp(min=0))
        return curves
