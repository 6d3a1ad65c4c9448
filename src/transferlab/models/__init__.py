"""Networks: a pretrained timm backbone with a new head (see ``build_classifier``)."""

from transferlab.models.classifier import Classifier, build_classifier, model_data_config

__all__ = ["Classifier", "build_classifier", "model_data_config"]
