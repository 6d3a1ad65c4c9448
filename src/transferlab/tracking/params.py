"""The resolved config as MLflow params: flat dotted keys, nothing cut short, and only what
describes the experiment (``experiment_params``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# MLflow's limit on a param value (Lightning's logger silently cuts at 250).
MAX_PARAM_LENGTH = 6000
# Config keys that say how the config is built or where a job writes, not what the
# experiment is: left out of the params (the config artifact holds them), so MLflow's
# Compare view and "show diff only" see the values a sweep varies.
BUILD_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_")
NOT_PARAMS = ("paths", "hydra", "allowed_targets")


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


def experiment_params(config: Mapping[str, Any]) -> dict[str, str]:
    """``flatten(config)`` without the build keys (``_target_``, ...), the paths and the
    allowed targets, and without any value under the job's own output folder (a per-job
    path such as the checkpoint folder)."""
    output_dir = str((config.get("paths") or {}).get("output_dir") or "")
    return {
        key: value
        for key, value in flatten(config).items()
        if key.split(".", 1)[0] not in NOT_PARAMS
        and key.rsplit(".", 1)[-1] not in BUILD_KEYS
        and not (output_dir and value.startswith(output_dir))
    }
