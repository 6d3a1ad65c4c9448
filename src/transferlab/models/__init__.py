"""Networks: a pretrained timm backbone with a new head (see ``build_classifier``).

The builders load on first use: they bring in timm and torch, and ``models.config`` and
``models.input_size`` are also read before torch loads (``transferlab.checks``).
"""

from typing import Any

__all__ = ["Classifier", "build_classifier", "model_data_config"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from transferlab.models import classifier

        return getattr(classifier, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
