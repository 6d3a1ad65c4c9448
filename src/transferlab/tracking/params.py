"""The resolved config as MLflow params: flat dotted keys, nothing cut short."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# MLflow's limit on a param value (Lightning's logger silently cuts at 250).
MAX_PARAM_LENGTH = 6000


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": "1", "c": "[1, 2]"}``."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def check_lengths(params: Mapping[str, str]) -> None:
    too_long = [k for k, v in params.items() if len(v) > MAX_PARAM_LENGTH]
    if too_long:
        raise ValueError(
            f"config values longer than MLflow's {MAX_PARAM_LENGTH} characters: {too_long}"
        )
