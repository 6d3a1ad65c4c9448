"""State-dict plumbing: read weight files, remap by position, and load strictly into a backbone."""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from transferlab.errors import UserError

StateDict = dict[str, torch.Tensor]

_CHECKPOINT_WRAPPERS = ("state_dict", "model")
_PROJECT_BACKBONE_PREFIX = "network.backbone."
_SHOWN = 3


def read_state_dict_file(path: str | Path) -> StateDict:
    """Tensors from a ``.safetensors`` or torch file: a timm state dict, wrapped or not, or a
    Lightning checkpoint of this project (its ``network.backbone.*`` tensors)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"weights file not found: {path}; set model.weights_file to an existing "
            ".safetensors/.pth/.ckpt file, or use model.pretrained=false"
        )
    try:
        if path.suffix == ".safetensors":
            loaded: object = safetensors.torch.load_file(path, device="cpu")
        else:
            with warnings.catch_warnings():  # a refused file is reported below, in one line
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to deserialise is the file's, e.g. IndexError on garbage
        raise UserError(
            f"could not read weights file {path} ({_reason(err)}); expected a .safetensors file or "
            "a torch.save'd state dict / Lightning checkpoint: re-export it or fix model.weights_file"
        ) from err
    return _unwrap(loaded, path)


def _reason(err: Exception) -> str:
    unsupported = re.search(r"Unsupported global: [^\n]*", str(err))
    if unsupported:
        return unsupported.group(0).strip()
    if isinstance(err, pickle.UnpicklingError):
        return "not a torch file, or it holds objects other than tensors"
    first_line = (
        str(err).strip().splitlines()[0][:120] if str(err).strip() else "empty or truncated"
    )
    return f"{type(err).__name__}: {first_line}"


def _unwrap(loaded: object, path: Path) -> StateDict:
    for key in _CHECKPOINT_WRAPPERS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise UserError(
            f"weights file {path} does not hold a state dict of tensors (nor one under "
            f"{' / '.join(_CHECKPOINT_WRAPPERS)}); save it with torch.save(model.state_dict(), PATH)"
        )
    if any(k.startswith(_PROJECT_BACKBONE_PREFIX) for k in loaded):
        n = len(_PROJECT_BACKBONE_PREFIX)
        return {k[n:]: v for k, v in loaded.items() if k.startswith(_PROJECT_BACKBONE_PREFIX)}
    return dict(loaded)


def remap_positional(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Size], origin: str
) -> StateDict:
    """Rename ``source`` tensors to ``target`` keys by position; every count and shape must match."""
    if len(source) != len(target):
        raise UserError(
            f"{origin} has {len(source)} tensors but the timm model expects {len(target)}: "
            "these weights are for another architecture or version"
        )
    pairs = list(zip(source.items(), target.items(), strict=True))
    bad = [
        f"{src} {tuple(tensor.shape)} -> {dst} {tuple(shape)}"
        for (src, tensor), (dst, shape) in pairs
        if tensor.shape != shape
    ]
    if bad:
        raise UserError(
            f"{origin} does not line up with the timm model: {len(bad)} shape mismatch(es), "
            f"first: {'; '.join(bad[:_SHOWN])}"
        )
    return {dst: tensor for (_, tensor), (dst, _) in pairs}


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module names of timm's original classifier (``pretrained_cfg['classifier']``)."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def load_backbone_state(
    backbone: nn.Module, state_dict: Mapping[str, torch.Tensor], origin: str
) -> None:
    """Load every backbone tensor, checking shapes; only the old classifier's keys may be extra."""
    expected = backbone.state_dict()
    extra_ok = classifier_prefixes(backbone)
    missing = [
        k for k in expected if k not in state_dict and not k.endswith(".num_batches_tracked")
    ]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    unexpected = [
        k
        for k in state_dict
        if k not in expected and not any(k == p or k.startswith(f"{p}.") for p in extra_ok)
    ]
    problems = [
        f"{len(keys)} {kind} ({', '.join(keys[:_SHOWN])}{', ...' if len(keys) > _SHOWN else ''})"
        for kind, keys in (
            ("missing", missing),
            ("shape mismatch", mismatched),
            ("unexpected", unexpected),
        )
        if keys
    ]
    if problems:
        arch = getattr(backbone, "pretrained_cfg", {}).get("architecture", type(backbone).__name__)
        raise UserError(
            f"weights from {origin} do not fit {arch}: {'; '.join(problems)}; check that they were "
            "saved from the same model.name and model.kwargs"
        )
    backbone.load_state_dict({k: state_dict[k] for k in expected if k in state_dict}, strict=True)
