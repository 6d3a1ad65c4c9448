"""Image classification: a pooled backbone and a new head, one label per image."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from transferlab.tasks.base import Task, construct_datamodule, register_task


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy, macro-F1 and, with more than five classes, top-5 accuracy."""
    metrics: dict[str, nn.Module] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


@register_task("classification")
class Classification(Task):
    target = "label"
    supports_feature_cache = True
    compare_metrics = ("test/acc", "test/f1", "test/top5")

    def build_datamodule(self, cfg: Any):
        from transferlab.data import TransferDataModule

        return construct_datamodule(TransferDataModule, cfg)

    def build_network(self, model_cfg: Any, num_classes: int) -> nn.Module:
        from transferlab.models import build_classifier

        return build_classifier(model_cfg, num_classes=num_classes)

    def criterion(self, cfg: Any) -> nn.Module:
        loss = cfg.get("loss") or {}
        return nn.CrossEntropyLoss(label_smoothing=float(loss.get("label_smoothing", 0.0)))

    def metrics(self, num_classes: int) -> MetricCollection:
        return classification_metrics(num_classes)

    def test_state(self, num_classes: int) -> dict[str, Metric]:
        return {"confusion": MulticlassConfusionMatrix(num_classes)}

    def report(self, run, cfg: Any, module: Any, datamodule: Any) -> None:
        """Confusion matrix (PNG) and per-class precision, recall and F1 (CSV)."""
        import matplotlib.pyplot as plt

        from transferlab.reports import confusion_figure, per_class_metrics

        confusion = module.test_state["confusion"].compute().cpu().numpy()
        names = list(datamodule.class_names)
        figure = confusion_figure(confusion, names, title=f"{cfg.model.name}: test set")
        run.log_figure(figure, "test/confusion_matrix.png")
        plt.close(figure)
        rows = per_class_metrics(confusion, names)
        header = ",".join(rows[0])
        lines = [",".join(str(v) for v in row.values()) for row in rows]
        run.log_text("\n".join([header, *lines]) + "\n", "test/per_class_metrics.csv")
