"""The model config, parsed from a Hydra ``model/`` group entry into typed dataclasses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from transferlab.errors import UserError


@dataclass(frozen=True)
class HeadConfig:
    type: str = "linear"
    hidden_dim: int = 512
    dropout: float = 0.0
    activation: str = "gelu"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    pretrained: bool = False
    weights: str = "hub"
    weights_file: str | None = None
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    head: HeadConfig = field(default_factory=HeadConfig)

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any] | DictConfig) -> ModelConfig:
        """Parse a DictConfig or plain mapping; unknown keys are a UserError."""
        raw = _to_dict(cfg, "model")
        if "name" not in raw:
            raise UserError("the model config has no 'name': set model.name=<timm architecture>")
        head = _known_keys(
            _to_dict(raw.pop("head", None) or {}, "model.head"), HeadConfig, "model.head"
        )
        values = _known_keys(raw, cls, "model")
        values["kwargs"] = _to_dict(values.get("kwargs") or {}, "model.kwargs")
        return cls(**values, head=HeadConfig(**head))


def _to_dict(cfg: Any, where: str) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise UserError(f"{where} must be a mapping, got {type(cfg).__name__}: {cfg!r}")


def _known_keys(raw: dict[str, Any], kind: type, where: str) -> dict[str, Any]:
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(
            f"unknown key(s) in {where}: {', '.join(unknown)}; known keys: {', '.join(sorted(known))}"
        )
    return raw
