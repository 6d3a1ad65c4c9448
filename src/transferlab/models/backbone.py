"""Create timm networks from the model config, with friendly errors for names and kwargs."""

from __future__ import annotations

import difflib
import re
from typing import Any

import timm
from timm.models import split_model_name_tag
from torch import nn

from transferlab.errors import UserError
from transferlab.models.config import ModelConfig

_RESERVED_KWARGS = ("num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay")
_UNEXPECTED_KWARG = re.compile(r"unexpected keyword argument '(\w+)'")


def create_backbone(config: ModelConfig) -> nn.Module:
    """The timm model with its classifier removed: forward returns pooled features."""
    return create_timm_model(config, num_classes=0)


def create_timm_model(config: ModelConfig, **overrides: Any) -> nn.Module:
    """``timm.create_model`` with the config's drop rates and kwargs, plus ``overrides``."""
    check_model_name(config.name)
    kwargs = timm_kwargs(config)
    try:
        return timm.create_model(config.name, **kwargs, **overrides)
    except TypeError as err:
        match = _UNEXPECTED_KWARG.search(str(err))
        if match is None or match.group(1) not in kwargs:
            raise
        key = match.group(1)
        where = f"model.kwargs.{key}" if key in config.kwargs else f"model.{key}=0"
        raise UserError(
            f"model '{config.name}' does not accept {key}={kwargs[key]!r}: remove it ({where})"
        ) from err


def timm_kwargs(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model``; zero drop rates are left to timm's defaults."""
    reserved = sorted(set(config.kwargs) & set(_RESERVED_KWARGS))
    if reserved:
        raise UserError(
            f"model.kwargs may not set {', '.join(reserved)}: the classifier size comes from the "
            "data and weights from model.pretrained / model.weights"
        )
    kwargs = dict(config.kwargs)
    if config.drop_rate:
        kwargs["drop_rate"] = config.drop_rate
    if config.drop_path_rate:
        kwargs["drop_path_rate"] = config.drop_path_rate
    return kwargs


def check_model_name(name: str) -> None:
    """Raise a UserError with close matches when timm has no such architecture or tag."""
    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise UserError(f"unknown model '{name}': {_suggest(arch, timm.list_models())}")
    if tag and name not in timm.list_pretrained(f"{arch}.*"):
        tags = timm.list_pretrained(f"{arch}.*")
        raise UserError(
            f"unknown pretrained tag '{tag}' for {arch}: choose one of {', '.join(tags) or 'none'}"
        )


def _suggest(name: str, candidates: list[str]) -> str:
    family = re.match(r"[a-z_]*", name.lower()).group(0).rstrip("_")  # type: ignore[union-attr]
    listing = f"python -c 'import timm; print(timm.list_models(\"{family}*\"))'"
    close = difflib.get_close_matches(name.lower(), candidates, n=3, cutoff=0.6)
    if close:
        return f"did you mean {', '.join(close)}? (list: {listing})"
    return f"no close match (list: {listing})"


def feature_dim(backbone: nn.Module) -> int:
    """Size of what a ``num_classes=0`` timm model returns: the pre-logits width when it has
    one (``head_hidden_size``: vgg, mobilenetv3), else ``num_features``."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


def feature_indices(backbone: nn.Module, strides: list[int], task: str) -> list[int]:
    """The indices of ``backbone.feature_info`` at ``strides`` (the last map of each), which
    the ``task``'s head needs; a backbone without them is one line naming the choices."""
    info = getattr(backbone, "feature_info", None)
    if not info or not hasattr(backbone, "forward_intermediates"):
        raise UserError(
            f"model {type(backbone).__name__} has no multi-scale features for {task}; "
            "choose a convolutional timm backbone (efficientnet_lite0, resnet18, ...)"
        )
    by_stride = {int(entry["reduction"]): i for i, entry in enumerate(info)}
    missing = [s for s in strides if s not in by_stride]
    if missing:
        raise UserError(
            f"model {type(backbone).__name__} gives features at strides {sorted(by_stride)}, "
            f"but {task} needs {list(strides)}: choose a convolutional backbone "
            "(efficientnet_lite0, resnet18, mobilenetv3_large_100, ...)"
        )
    return [by_stride[s] for s in strides]
