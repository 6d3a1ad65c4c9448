"""Figures and tables made from a finished run's predictions."""

from transferlab.reports.confusion import confusion_figure, per_class_metrics

__all__ = ["confusion_figure", "per_class_metrics"]
