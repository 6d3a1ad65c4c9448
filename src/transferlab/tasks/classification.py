"""Image classification: a pooled backbone and a new head, one label per image."""

from __future__ import annotations

from typing import Any

import torch
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
    compare_figures = ("test/confusion_matrix.png",)
    serving_model = "transferlab.tracking.model:ImageClassifier"
    exportable = True

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

    def shifted_test_set(self, datamodule: Any, corruption: str, severity: int, seed: int) -> Any:
        import copy

        from transferlab.shift import with_corruption

        shifted = copy.copy(datamodule.test_set)
        shifted.transform = with_corruption(datamodule.eval_transform, corruption, severity, seed)
        return shifted

    def preprocessing(self, cfg: Any) -> tuple[Any, str, tuple[int, int, int]]:
        from transferlab.inference import classification_preprocessing

        return classification_preprocessing(cfg)

    def predict(self, model: Any, request: Any) -> None:
        from transferlab.predict import classify

        classify(model, request)

    def explain_titles(self, class_names: Any, outputs: Any, explained: Any) -> list[str]:
        from transferlab.explain import class_titles

        return class_titles(class_names, outputs, explained)

    def test_state(self, num_classes: int) -> dict[str, Metric]:
        from transferlab.reports.calibration import SplitLogits

        return {"confusion": MulticlassConfusionMatrix(num_classes), "logits": SplitLogits()}

    def report(self, run, cfg: Any, module: Any, datamodule: Any) -> None:
        """Confusion matrix (PNG), per-class precision, recall and F1 (CSV), the most
        confused pairs, calibration, and Grad-CAM of correctly and wrongly classified test
        images (PNG)."""
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
        report_confused_pairs(run, cfg, module, datamodule, confusion)
        report_calibration(run, cfg, module, datamodule)
        report_gradcam(run, cfg, module, datamodule)


EXAMPLES_PER_PAIR = 4


def report_confused_pairs(run, cfg: Any, module: Any, datamodule: Any, confusion: Any) -> None:
    """The most frequent mistakes (CSV) and test images of each (PNG): the test logits are
    in test-set order, so image ``i`` of the test set is the one logit row ``i`` scored."""
    import matplotlib.pyplot as plt

    from transferlab.reports.confusion import confused_pairs_figure, for_display, top_confusions

    mistakes = top_confusions(confusion)
    names = list(datamodule.class_names)
    lines = ["true,predicted,count,share_of_true_class"]
    lines += [
        f"{names[t]},{names[p]},{n},{n / max(1, confusion[t].sum()):.4f}" for t, p, n in mistakes
    ]
    run.log_text("\n".join(lines) + "\n", "test/confused_pairs.csv")
    if not mistakes:
        return
    logits, target = (t.cpu() for t in module.test_state["logits"].compute())
    predicted = logits.argmax(1)
    pairs = []
    for true, guess, count in mistakes:
        where = torch.nonzero((target == true) & (predicted == guess)).flatten()
        images = [
            for_display(datamodule.test_set[int(i)]["image"].numpy())
            for i in where[:EXAMPLES_PER_PAIR]
        ]
        pairs.append((names[true], names[guess], count, images))
    figure = confused_pairs_figure(
        pairs, title=f"{cfg.model.name}: most confused (true → predicted)"
    )
    run.log_figure(figure, "test/confused_pairs.png")
    plt.close(figure)


def validation_logits(module: Any, datamodule: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's logits and the labels over the whole validation split."""
    logits, labels = [], []
    module.eval()
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            logits.append(module.infer({"image": batch["image"].to(module.device)}).cpu())
            labels.append(batch["label"])
    return torch.cat(logits), torch.cat(labels)


def report_calibration(run, cfg: Any, module: Any, datamodule: Any) -> None:
    """``test/ece`` and the reliability diagram; with ``calibrate=true``, after temperature
    scaling fitted on the validation split, with the values before it alongside."""
    import matplotlib.pyplot as plt

    from transferlab.reports import calibration

    logits, target = (t.cpu() for t in module.test_state["logits"].compute())
    logits = logits.double()
    probs = logits.softmax(1)
    ece = calibration.expected_calibration_error(probs, target)
    diagrams = {"uncalibrated": (calibration.reliability_bins(probs, target), ece)}
    metrics = {"test/ece": ece}
    if cfg.get("calibrate", False):
        temperature = calibration.fit_temperature(*validation_logits(module, datamodule))
        scaled = (logits / temperature).softmax(1)
        scaled_ece = calibration.expected_calibration_error(scaled, target)
        diagrams["temperature-scaled"] = (calibration.reliability_bins(scaled, target), scaled_ece)
        metrics = {
            "test/ece": scaled_ece,
            "test/ece_uncalibrated": ece,
            "calibration/temperature": temperature,
        }
    run.log_metrics(metrics)
    run.log_text(
        calibration.reliability_csv({name: rows for name, (rows, _) in diagrams.items()}),
        "test/reliability.csv",
    )
    title = f"{cfg.model.name}: test set"
    if "calibration/temperature" in metrics:
        title += f", temperature T={metrics['calibration/temperature']:.3f} fitted on val"
    figure = calibration.reliability_figure(diagrams, title=title)
    run.log_figure(figure, "test/reliability.png")
    plt.close(figure)


GRADCAM_EXAMPLES = 8  # correctly classified test images, and as many wrongly


def spread_over_classes(indices: torch.Tensor, labels: torch.Tensor, count: int) -> list[int]:
    """Up to ``count`` of ``indices`` (in test-set order), taking each true class in turn so
    that one class does not fill the grid."""
    queues: dict[int, list[int]] = {}
    for i in indices.tolist():
        queues.setdefault(int(labels[i]), []).append(i)
    chosen: list[int] = []
    while len(chosen) < count and any(queues.values()):
        for label in sorted(queues):
            if queues[label] and len(chosen) < count:
                chosen.append(queues[label].pop(0))
    return chosen


def report_gradcam(run, cfg: Any, module: Any, datamodule: Any) -> None:
    """Grad-CAM of the predicted class for up to ``GRADCAM_EXAMPLES`` correctly and as many
    wrongly classified test images, chosen in test-set order class by class, titled with
    their true and predicted classes (PNG). Computed on a plain fp32 CPU copy of the
    network, whatever the run's device and runtime."""
    import matplotlib.pyplot as plt

    from transferlab.reports.gradcam import (
        gradcam_figure,
        heat_maps,
        panels_of,
        plain_cpu_copy,
        prediction_title,
    )

    logits, target = (t.cpu() for t in module.test_state["logits"].compute())
    predicted = logits.argmax(1)
    correct = torch.nonzero(predicted == target).flatten()
    wrong = torch.nonzero(predicted != target).flatten()
    groups = [
        ("correct", spread_over_classes(correct, target, GRADCAM_EXAMPLES)),
        ("wrong", spread_over_classes(wrong, target, GRADCAM_EXAMPLES)),
    ]
    chosen = [i for _, indices in groups for i in indices]
    if not chosen:
        return
    names = list(datamodule.class_names)
    images = torch.stack([datamodule.test_set[i]["image"] for i in chosen])
    maps = heat_maps(plain_cpu_copy(module.network), images, [int(predicted[i]) for i in chosen])
    titles = [prediction_title(names[int(predicted[i])], names[int(target[i])]) for i in chosen]
    panels = iter(panels_of(images, maps.maps, titles))
    figure = gradcam_figure(
        [(label, [next(panels) for _ in indices]) for label, indices in groups if indices],
        title=f"{cfg.model.name}: Grad-CAM of the predicted class ({maps.layer}), test set",
    )
    run.log_figure(figure, "test/gradcam.png")
    plt.close(figure)
