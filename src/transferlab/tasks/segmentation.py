"""Semantic segmentation: a class per pixel; a timm backbone with a smp decoder.

Loss: cross-entropy, Dice, or their sum (``task.loss``), pixels labelled ``ignore_index``
(255, as VOC and most labelling tools) left out. Metrics over a whole split (torchmetrics
accumulates the confusion over every pixel): mIoU (macro Jaccard), pixel accuracy and
Dice (macro F1 over pixels). Test report: per-class IoU (CSV), a grid of test images
with the true and predicted masks overlaid (PNG), and their Grad-CAM heat maps (PNG).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassConfusionMatrix

from transferlab.errors import UserError
from transferlab.tasks.base import Task, construct_datamodule, photometric_test_set, register_task

LOSSES = ("ce", "dice", "ce+dice")
REPORT_IMAGES = 8


class SegmentationLoss(nn.Module):
    """Cross-entropy, Dice or their sum over the labelled pixels."""

    def __init__(self, kind: str, ignore_index: int) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise UserError(f"task.loss={kind!r} is not one of {', '.join(LOSSES)}")
        from segmentation_models_pytorch.losses import DiceLoss

        parts = kind.split("+")
        self.ce = nn.CrossEntropyLoss(ignore_index=ignore_index) if "ce" in parts else None
        self.dice = DiceLoss("multiclass", ignore_index=ignore_index) if "dice" in parts else None

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        losses = [loss(logits, mask) for loss in (self.ce, self.dice) if loss is not None]
        return torch.stack(losses).sum()


class SegmentationScores(MulticlassConfusionMatrix):
    """mIoU, pixel accuracy and Dice from one confusion matrix over every labelled pixel.

    torchmetrics accumulates (and, across processes, sums) the matrix; the three scores
    reduce it as its ``MulticlassJaccardIndex`` (macro), ``MulticlassAccuracy`` (micro)
    and ``MulticlassF1Score`` (macro) do, classes absent from both the truth and the
    prediction left out of the means. One pass over the pixels instead of one per metric
    (and none more for the report's per-class IoU): evaluation cost is in
    ``scripts/bench_overhead.py --task segmentation``.
    """

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        super().__init__(num_classes, ignore_index=ignore_index)

    def per_class_iou(self) -> torch.Tensor:
        """IoU of each class (0 where a class is neither in the truth nor predicted)."""
        confmat = self.confmat.double()
        hits = confmat.diag()
        union = confmat.sum(0) + confmat.sum(1) - hits
        return torch.where(union > 0, hits / union.clamp(min=1), 0.0)

    def compute(self) -> dict[str, torch.Tensor]:
        confmat = self.confmat.double()
        hits = confmat.diag()
        seen = (confmat.sum(0) + confmat.sum(1)) > 0
        dice = 2 * hits / (confmat.sum(0) + confmat.sum(1)).clamp(min=1)
        count = seen.sum().clamp(min=1)
        return {
            "miou": (self.per_class_iou()[seen].sum() / count).float(),
            "pixel_acc": (hits.sum() / confmat.sum().clamp(min=1)).float(),
            "dice": (dice[seen].sum() / count).float(),
        }


@register_task("segmentation")
class Segmentation(Task):
    target = "mask"
    supports_feature_cache = False
    spatial_targets = True
    compare_metrics = ("test/miou", "test/dice", "test/pixel_acc")
    compare_figures = ("test/predictions.png",)
    serving_model = "transferlab.tracking.model:ImageSegmenter"
    exportable = True

    def __init__(
        self, decoder: str = "unet", loss: str = "ce+dice", ignore_index: int = 255
    ) -> None:
        from transferlab.models.segmentation import DECODERS

        if decoder not in DECODERS:
            raise UserError(f"unknown task.decoder {decoder!r}: choose from {', '.join(DECODERS)}")
        if loss not in LOSSES:
            raise UserError(f"task.loss={loss!r} is not one of {', '.join(LOSSES)}")
        self.decoder, self.loss, self.ignore_index = decoder, loss, int(ignore_index)

    def build_datamodule(self, cfg: Any):
        from transferlab.data.seg_datamodule import SegmentationDataModule

        return construct_datamodule(SegmentationDataModule, cfg, ignore_index=self.ignore_index)

    def build_network(self, model_cfg: Any, num_classes: int) -> nn.Module:
        from transferlab.models.segmentation import build_segmenter

        return build_segmenter(model_cfg, num_classes, self.decoder)

    def criterion(self, cfg: Any) -> nn.Module:
        return SegmentationLoss(self.loss, self.ignore_index)

    def metrics(self, num_classes: int) -> MetricCollection:
        return MetricCollection({"scores": SegmentationScores(num_classes, self.ignore_index)})

    def test_state(self, num_classes: int) -> dict[str, Metric]:
        return {}  # the report reads the test metrics' own confusion matrix

    def shifted_test_set(self, datamodule: Any, corruption: str, severity: int, seed: int) -> Any:
        """The test split with a photometric corruption on each image; masks unchanged."""
        return photometric_test_set(self, datamodule, corruption, severity, seed)

    def preprocessing(self, cfg: Any) -> tuple[Any, str, tuple[int, int, int]]:
        from transferlab.data.seg_datamodule import SegmentationDataModule
        from transferlab.inference import paired_preprocessing

        return paired_preprocessing(SegmentationDataModule, cfg)

    def predict(self, model: Any, request: Any) -> None:
        from transferlab.predict import segment

        segment(model, request)

    def explain_titles(self, class_names: Any, outputs: Any, explained: Any) -> list[str]:
        from transferlab.explain import segment_titles

        return segment_titles(class_names, outputs, explained)

    def report(self, run, cfg: Any, module: Any, datamodule: Any) -> None:
        """Per-class IoU (CSV), test images with true and predicted masks (PNG) and their
        Grad-CAM heat maps (PNG)."""
        import matplotlib.pyplot as plt

        from transferlab.reports.segmentation import overlay_grid

        iou = module.test_metrics["scores"].per_class_iou().cpu().tolist()
        names = list(datamodule.class_names)
        lines = [
            "class,iou",
            *(f"{name},{value:.4f}" for name, value in zip(names, iou, strict=True)),
        ]
        run.log_text("\n".join(lines) + "\n", "test/per_class_iou.csv")
        batch = next(iter(datamodule.test_dataloader()))
        images = batch["image"][:REPORT_IMAGES]
        module.eval()
        with torch.no_grad():
            predicted = module.infer({"image": images.to(module.device)}).argmax(1).cpu()
        figure = overlay_grid(
            datamodule.denormalize(images),
            batch["mask"][:REPORT_IMAGES],
            predicted,
            names,
            self.ignore_index,
            title=f"{cfg.model.name} + {self.decoder}: test images, true and predicted masks",
        )
        run.log_figure(figure, "test/predictions.png")
        plt.close(figure)
        report_gradcam(run, cfg, module, images, batch["mask"][:REPORT_IMAGES], names)


def report_gradcam(
    run, cfg: Any, module: Any, images: torch.Tensor, masks: torch.Tensor, names: list[str]
) -> None:
    """Grad-CAM of the report's test images (PNG), each for its most frequent predicted
    class other than the background: that class's logits summed over its predicted pixels.
    Computed on a plain fp32 CPU copy of the network, whatever the run's runtime."""
    import matplotlib.pyplot as plt

    from transferlab.reports.gradcam import (
        gradcam_figure,
        heat_maps,
        most_frequent_class,
        panels_of,
        plain_cpu_copy,
        prediction_title,
    )

    maps = heat_maps(plain_cpu_copy(module.network), images)
    titles = [
        prediction_title(names[explained], names[most_frequent_class(mask, len(names))])
        for explained, mask in zip(maps.classes, masks, strict=True)
    ]
    figure = gradcam_figure(
        [("", panels_of(images, maps.maps, titles))],
        title=f"{cfg.model.name}: Grad-CAM of each image's main predicted class ({maps.layer})",
    )
    run.log_figure(figure, "test/gradcam.png")
    plt.close(figure)
