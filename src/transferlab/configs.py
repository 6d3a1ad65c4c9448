"""Reading one option of a config group from ``conf/`` without composing a whole run."""

from __future__ import annotations

from typing import Any

from transferlab import CONF_DIR
from transferlab.errors import UserError


def group_options(group: str) -> list[str]:
    """The options of config group ``group`` (its ``conf/<group>/*.yaml`` files)."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def option_values(group: str, name: str) -> dict[str, Any]:
    """What ``conf/<group>/<name>.yaml`` sets, the options in its ``defaults`` list merged
    first (as Hydra composes ``<group>=<name>``); an unknown option is one line."""
    from omegaconf import OmegaConf

    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown {group}={name}: choose from {', '.join(group_options(group))}")
    node = OmegaConf.to_container(OmegaConf.load(path))
    values: dict[str, Any] = {}
    for base in node.pop("defaults", None) or []:
        if base != "_self_":
            values = merged(values, option_values(group, base))
    return merged(values, node)


def merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out
