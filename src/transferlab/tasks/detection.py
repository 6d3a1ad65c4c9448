"""Object detection: a box and a class for each object; a timm backbone under a torchvision
detector (``models.detection``: FCOS, RetinaNet or Faster R-CNN on a feature pyramid).

Batches: ``image`` and ``target``, a list of per-image ``{boxes, labels, iscrowd,
image_id}`` (``data.det_datamodule``); labels 1..C-1, 0 the background. Training: the
network takes the images and targets and returns its loss terms, summed into the loss
(each term logged per epoch, ``train/<term>``); there are no train metrics, which would
need a second, eval-mode forward of every batch. Validation and test: the detections of an
eval forward, in the run's eval precision (the detector decodes boxes in fp32), and COCO's
mAP over the whole split: ``map`` (IoU .50:.95), ``map_50``, ``map_75``, ``mar_100``, crowd
regions ignored. No ``val/loss``: a detector computes its losses in its train-mode forward
only. Test report: per-class AP (CSV), test images with true and predicted boxes (PNG), a
precision-recall curve per class (PNG).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection

from transferlab.errors import UserError
from transferlab.tasks.base import (
    Step,
    Task,
    construct_datamodule,
    photometric_test_set,
    register_task,
)

REPORT_IMAGES = 8
# Predicted boxes drawn on the report's test images: those scoring at least this (the
# metrics use every detection down to the detector's score_thresh, 0.05 by default). On
# the default run's first 8 test images (28 true boxes) 0.5 draws 43 boxes, 0.3 draws 139.
REPORT_SCORE = 0.5


class DetectionLoss(nn.Module):
    """The sum of a detector's loss terms (classification, box regression, ...)."""

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        from transferlab.models.detection import detection_loss

        return detection_loss(losses)


@register_task("detection")
class Detection(Task):
    target = "target"
    supports_feature_cache = False
    spatial_targets = True
    compare_metrics = ("test/map", "test/map_50", "test/map_75", "test/mar_100")
    compare_figures = ("test/predictions.png",)
    serving_model = "transferlab.tracking.model:ImageDetector"

    def __init__(
        self,
        detector: str = "fcos",
        image_size: int = 128,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        from transferlab.models.detection import DETECTORS

        if detector not in DETECTORS:
            raise UserError(
                f"unknown detector {detector!r}: choose detector= from {', '.join(DETECTORS)}"
            )
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise UserError(f"task.image_size={image_size!r} must be a positive number of pixels")
        if options is not None and not isinstance(options, Mapping):
            raise UserError(f"task.options={options!r} must be a mapping such as {{}}")
        self.detector, self.image_size = detector, image_size
        self.options = dict(options or {})

    def build_datamodule(self, cfg: Any):
        from transferlab.data.det_datamodule import DetectionDataModule

        datamodule = construct_datamodule(DetectionDataModule, cfg)
        size = int(datamodule.data_config["input_size"][1])
        if size != self.image_size:
            raise UserError(
                f"task.image_size={self.image_size} sizes the feature pyramid for {size} px "
                f"images (data.image_size): leave task.image_size unset, or set both the same"
            )
        return datamodule

    def build_network(self, model_cfg: Any, num_classes: int) -> nn.Module:
        from transferlab.models.detection import build_detector

        return build_detector(
            model_cfg, num_classes, self.detector, image_size=self.image_size, **self.options
        )

    def criterion(self, cfg: Any) -> nn.Module:
        return DetectionLoss()

    def metrics(self, num_classes: int) -> MetricCollection:
        from transferlab.tasks.detection_metrics import DetectionScores

        return MetricCollection({"scores": DetectionScores(num_classes)})

    def train_metrics(self, num_classes: int) -> MetricCollection | None:
        return None

    def training_step(self, module: Any, batch: Mapping[str, Any]) -> Step:
        losses = module(batch["image"], batch["target"])
        terms = {
            name if name.startswith("loss_") else f"loss_{name}": v for name, v in losses.items()
        }
        return Step(module.criterion(losses), None, terms)

    def evaluation_step(self, module: Any, batch: Mapping[str, Any]) -> Step:
        return Step(None, module.infer(batch))

    def shifted_test_set(self, datamodule: Any, corruption: str, severity: int, seed: int) -> Any:
        """The test split with a photometric corruption on each image; boxes unchanged."""
        return photometric_test_set(self, datamodule, corruption, severity, seed)

    def preprocessing(self, cfg: Any) -> tuple[Any, str, tuple[int, int, int]]:
        from transferlab.data.det_datamodule import DetectionDataModule
        from transferlab.inference import paired_preprocessing

        return paired_preprocessing(DetectionDataModule, cfg)

    def predict(self, model: Any, request: Any) -> None:
        from transferlab.predict import detect

        detect(model, request)

    def explain_titles(self, class_names: Any, outputs: Any, explained: Any) -> list[str]:
        from transferlab.explain import detect_titles

        return detect_titles(class_names, outputs, explained)

    def report(self, run, cfg: Any, module: Any, datamodule: Any) -> None:
        """Per-class AP (CSV), test images with their true and predicted boxes (PNG) and the
        precision-recall curve of each class (PNG)."""
        import matplotlib.pyplot as plt

        from transferlab.reports.detection import boxes_grid, pr_curves_figure

        scores = module.test_metrics["scores"]
        names = list(datamodule.class_names)
        run.log_text(per_class_csv(scores, names), "test/per_class_ap.csv")
        title = f"{cfg.model.name} + {self.detector}"
        figure = pr_curves_figure(scores.pr_curves(), names, f"{title}: test set")
        run.log_figure(figure, "test/pr_curves.png")
        plt.close(figure)
        batch = next(iter(datamodule.test_dataloader()))
        images = batch["image"][:REPORT_IMAGES]
        truth = [  # crowd regions are not boxes to find: not drawn
            {"boxes": t["boxes"][t["iscrowd"] == 0]} for t in batch["target"][:REPORT_IMAGES]
        ]
        module.eval()
        with torch.no_grad():
            found = module.infer({"image": images.to(module.device)})
        found = [{key: value.cpu() for key, value in image.items()} for image in found]
        figure = boxes_grid(
            datamodule.denormalize(images),
            truth,
            found,
            names,
            REPORT_SCORE,
            f"{title}: test images",
        )
        run.log_figure(figure, "test/predictions.png")
        plt.close(figure)
        report_gradcam(run, cfg, module, images, names)


def report_gradcam(run, cfg: Any, module: Any, images: torch.Tensor, names: list[str]) -> None:
    """Grad-CAM of the report's test images (PNG), each for the class of its best detection:
    the sum of that class's detection scores. On a plain fp32 CPU copy of the network."""
    import matplotlib.pyplot as plt

    from transferlab.explain import detect_titles
    from transferlab.reports.gradcam import gradcam_figure, heat_maps, panels_of, plain_cpu_copy

    maps = heat_maps(plain_cpu_copy(module.network), images)
    titles = detect_titles(names, maps.outputs, maps.classes)
    figure = gradcam_figure(
        [("", panels_of(images, maps.maps, titles))],
        title=f"{cfg.model.name}: Grad-CAM of each image's best detected class ({maps.layer})",
    )
    run.log_figure(figure, "test/gradcam.png")
    plt.close(figure)


def per_class_csv(scores: Any, names: list[str]) -> str:
    """``class,ap,ap_50,boxes``: each class's AP at IoU .50:.95 and at .50 over the test
    split, and its number of test boxes (crowd regions not counted); ``nan`` for a class
    without test boxes."""
    ap = scores.per_class_ap()
    curves = scores.pr_curves()
    boxes = scores.per_class_boxes()
    lines = ["class,ap,ap_50,boxes"]
    for label in range(1, len(names)):
        ap_50 = float(curves[label][1].mean()) if label in curves else math.nan
        lines.append(f"{names[label]},{ap[label]:.4f},{ap_50:.4f},{boxes[label]}")
    return "\n".join(lines) + "\n"
