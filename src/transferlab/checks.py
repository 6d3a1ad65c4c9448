"""Config checks that run before torch loads: a mistake fails in a second, in one line.

Importing torch and Lightning takes about 15 s on 2 cores; everything a config alone can
tell is wrong is refused here first, from the composed config, a few tables and the file
system (no torch, timm or Lightning). What needs those libraries (a timm model name, the
content of a weights file, an image's pixels) is checked where it is built.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from transferlab import distributed
from transferlab.errors import UserError

MAX_SEED = 2**32 - 1  # what numpy and Lightning accept


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_config(cfg: DictConfig) -> None:
    """Refuse what is wrong in a run's config before anything heavy loads (one UserError)."""
    plain = resolved(cfg)
    check_run_keys(plain)
    check_tracking(plain.get("tracking") or {})
    check_targets(plain)
    check_trainer(plain.get("trainer") or {})
    distributed.check(plain)
    for group in ("optimizer", "scheduler"):
        check_call_arguments(plain.get(group), group)
    check_data(plain.get("data") or {})
    check_model(plain.get("model"), plain.get("data") or {})


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` as plain values; an interpolation that does not resolve names its key."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "the config"
        raise UserError(f"{key}: {str(err).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- run keys


def check_run_keys(cfg: Mapping[str, Any]) -> None:
    """mode, monitor, seed, num_threads, calibrate and the callbacks' shape."""
    if cfg.get("mode") not in ("min", "max"):
        raise UserError(f"mode={cfg.get('mode')!r} must be 'min' or 'max'")
    if not str(cfg.get("monitor")).startswith("val/"):
        raise UserError(
            f"monitor={cfg.get('monitor')!r} must be a validation metric such as val/acc"
        )
    seed = cfg.get("seed")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed={seed!r} must be an integer from 0 to {MAX_SEED}")
    threads = cfg.get("num_threads")
    if threads is not None and not (_is_int(threads) and threads >= 1):
        raise UserError(f"num_threads={threads!r} must be 1 or more (null: automatic)")
    if not isinstance(cfg.get("calibrate", False), bool):
        raise UserError(f"calibrate={cfg.get('calibrate')!r} must be true or false")
    for name, entry in (cfg.get("callbacks") or {}).items():
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            raise UserError(f"callbacks.{name} needs a _target_ (a callback class path)")


def check_tracking(tracking: Mapping[str, Any]) -> None:
    """``tracking=server`` has a server's URI (before torch loads; the run checks it too)."""
    from transferlab.tracking.store import check_server_uri

    if tracking.get("enabled", True) and tracking.get("server", False):
        check_server_uri(tracking.get("uri"))


# ----------------------------------------------------------------------------- _target_


def check_targets(cfg: Mapping[str, Any]) -> None:
    """Every ``_target_`` anywhere in the config must match ``allowed_targets``."""
    allowed = cfg.get("allowed_targets") or []
    if not isinstance(allowed, list):
        raise UserError(f"allowed_targets={allowed!r} must be a list such as [torch.optim.*]")
    for pattern in allowed:
        if not isinstance(pattern, str) or not _valid_pattern(pattern):
            raise UserError(
                f"allowed_targets entry {pattern!r} must be a dotted path, or a package "
                "followed by .* (such as torch.optim.*)"
            )
    found = refused_target(cfg, allowed, "")
    if found is not None:
        raise refused_target_error(*found, allowed)


def refused_target(node: Any, allowed: Sequence[str], path: str) -> tuple[str, str] | None:
    """The first (config path, target) under ``node`` whose ``_target_`` is not allowed."""
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if target is not None and not target_allowed(str(target), allowed):
            return path or "the config", str(target)
        for key, value in node.items():
            found = refused_target(value, allowed, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found = refused_target(value, allowed, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def target_allowed(target: str, allowed: Sequence[str]) -> bool:
    """Hydra's rule: an exact entry, or ``package.*`` for anything under ``package``."""
    return any(
        target.startswith(pattern[:-1]) if pattern.endswith(".*") else target == pattern
        for pattern in allowed
    )


def refused_target_error(path: str, target: str, allowed: Sequence[str]) -> UserError:
    return UserError(
        f"{path}: _target_ {target!r} is not in allowed_targets; to trust it, add its "
        f"package: 'allowed_targets=[{','.join(allowed)},your_pkg.*]'"
    )


def _valid_pattern(pattern: str) -> bool:
    stem = pattern[:-2] if pattern.endswith(".*") else pattern
    return bool(stem) and "*" not in stem and all(part for part in stem.split("."))


# ----------------------------------------------------------------------------- trainer


def check_trainer(trainer: Mapping[str, Any]) -> None:
    """Epoch, step and batch counts the Trainer would accept but that make no run."""
    epochs = trainer.get("max_epochs")
    if not (_is_int(epochs) and epochs >= 1):
        raise UserError(
            f"trainer.max_epochs={epochs!r} must be a whole number of epochs, 1 or more"
        )
    for key, minimum in (
        ("min_epochs", 0),
        ("accumulate_grad_batches", 1),
        ("check_val_every_n_epoch", 1),
        ("log_every_n_steps", 1),
        ("num_sanity_val_steps", -1),
    ):
        value = trainer.get(key)
        if value is not None and not (_is_int(value) and value >= minimum):
            raise UserError(f"trainer.{key}={value!r} must be a whole number, {minimum} or more")
    steps = trainer.get("max_steps")
    if steps is not None and not (_is_int(steps) and (steps == -1 or steps >= 1)):
        raise UserError(f"trainer.max_steps={steps!r} must be 1 or more, or -1 (no limit)")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = trainer.get(key)
        if value is None:
            continue
        if not (_is_int(value) and value >= 1) and not (
            _is_number(value) and not _is_int(value) and 0 < value <= 1
        ):
            raise UserError(
                f"trainer.{key}={value!r} must be a number of batches (1 or more) or a "
                "fraction of them in (0, 1]"
            )
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not (_is_number(clip) and clip >= 0):
        raise UserError(f"trainer.gradient_clip_val={clip!r} must be 0 or more (null: no clipping)")


# ----------------------------------------------------------------------------- optimizer


@dataclass(frozen=True)
class Kind:
    """What an argument's value must be."""

    description: str
    accepts: Callable[[Any], bool]


NUMBER = Kind("a number", _is_number)
FLAG = Kind("true or false", lambda v: isinstance(v, bool))
FLAG_OR_NULL = Kind("true, false or null", lambda v: v is None or isinstance(v, bool))
PAIR = Kind(
    "two numbers such as [0.9, 0.999]",
    lambda v: isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)),
)

# The arguments a config may give each optimizer and scheduler target it names (the
# parameters, steps and restarts come from the code). A target not listed here is checked
# only when it is built; tests/test_bad_inputs.py compares this table with the targets'
# signatures and with the keys of conf/optimizer/*.yaml and conf/scheduler/*.yaml.
TARGET_ARGUMENTS: dict[str, dict[str, Kind]] = {
    "torch.optim.AdamW": {
        "lr": NUMBER,
        "betas": PAIR,
        "eps": NUMBER,
        "weight_decay": NUMBER,
        "amsgrad": FLAG,
        "maximize": FLAG,
        "foreach": FLAG_OR_NULL,
        "capturable": FLAG,
        "differentiable": FLAG,
        "fused": FLAG_OR_NULL,
    },
    "torch.optim.SGD": {
        "lr": NUMBER,
        "momentum": NUMBER,
        "dampening": NUMBER,
        "weight_decay": NUMBER,
        "nesterov": FLAG,
        "maximize": FLAG,
        "foreach": FLAG_OR_NULL,
        "differentiable": FLAG,
        "fused": FLAG_OR_NULL,
    },
    "transferlab.optim.cosine_with_warmup": {"warmup_epochs": NUMBER, "min_lr_ratio": NUMBER},
    "transferlab.optim.one_cycle": {
        "pct_start": NUMBER,
        "div_factor": NUMBER,
        "final_div_factor": NUMBER,
    },
}
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})


def check_call_arguments(node: Any, group: str) -> None:
    """The keys and value kinds of the ``optimizer`` or ``scheduler`` group, for known targets."""
    if node is None and group == "scheduler":
        return
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise UserError(f"{group} needs a _target_: choose one with {group}=<option>")
    arguments = TARGET_ARGUMENTS.get(str(node["_target_"]))
    if arguments is None:
        return
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        kind = arguments.get(key)
        if kind is None:
            close = difflib.get_close_matches(key, arguments, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(
                f"{group}.{key}: {node['_target_']} takes no argument {key!r}{hint}; "
                f"it takes {', '.join(arguments)}"
            )
        if not kind.accepts(value):
            raise UserError(f"{group}.{key}={value!r} must be {kind.description}")


# ----------------------------------------------------------------------------- data, model


def check_data(data: Mapping[str, Any]) -> None:
    """Sizes, counts and fractions of the ``data`` group, and an image folder's layout."""
    for key in ("batch_size", "image_size", "eval_batch_size", "samples_per_class"):
        _check_positive(data, key, required=key == "batch_size")
    for key in ("val_per_class", "train_images", "images_per_class", "images_per_identity"):
        _check_positive(data, key)
    for key in ("val_fraction", "test_fraction"):
        value = data.get(key, 0.0)
        if not (_is_number(value) and 0 <= value < 1):
            raise UserError(f"data.{key}={value!r} must be in [0, 1)")
    workers = data.get("num_workers", "auto")
    if workers != "auto" and not (_is_int(workers) and workers >= 0):
        raise UserError(f"data.num_workers={workers!r} must be 'auto' or a number, 0 or more")
    pin = data.get("pin_memory", "auto")
    if pin != "auto" and not isinstance(pin, bool):
        raise UserError(f"data.pin_memory={pin!r} must be 'auto', true or false")
    if data.get("source") == "image_folder":
        from transferlab.data.sources import image_folder_layout

        root = data.get("root")
        image_folder_layout(Path(root).expanduser() if root not in (None, "", "???") else None)
    if data.get("source") == "coco":
        check_coco_files(data)


COCO_FILES = ("annotations", "val_annotations", "test_annotations")


def check_coco_files(data: Mapping[str, Any]) -> None:
    """``data=coco`` names its training annotations, and every annotation file it names exists
    (relative paths from ``data.root``, as ``data.detection.coco_detection`` reads them)."""
    if not data.get("annotations"):
        raise UserError("data=coco needs data.annotations=FILE (a COCO-format JSON)")
    root = data.get("root")
    for key in COCO_FILES:
        if not data.get(key):
            continue
        path = Path(str(data[key])).expanduser()
        if root and not path.is_absolute():
            path = Path(str(root)).expanduser() / path
        if not path.is_file():
            raise UserError(
                f"data.{key}={path} does not exist: point it at a COCO-format JSON file"
            )


def check_model(model: Any, data: Mapping[str, Any]) -> None:
    """The model group's keys, its weights file, and an image size the architecture takes."""
    from transferlab.models.config import ModelConfig
    from transferlab.models.input_size import min_image_size

    config = ModelConfig.from_cfg(model if isinstance(model, Mapping) else {})
    if config.pretrained and config.weights == "file":
        if not config.weights_file:
            raise UserError("model.weights=file needs model.weights_file=PATH")
        if not Path(config.weights_file).expanduser().is_file():
            raise UserError(
                f"weights file not found: {config.weights_file}; set model.weights_file to an "
                "existing .safetensors/.pth/.ckpt file, or use model.pretrained=false"
            )
    size = data.get("image_size")
    minimum = min_image_size(config.name)
    if size is not None and size < minimum:
        raise UserError(
            f"model {config.name} needs images of at least {minimum} px, but "
            f"data.image_size={size}: set data.image_size={minimum} or more"
        )


def _check_positive(data: Mapping[str, Any], key: str, required: bool = False) -> None:
    value = data.get(key)
    if (value is not None or required) and not (_is_int(value) and value >= 1):
        raise UserError(f"data.{key}={value} must be a positive integer")


# ----------------------------------------------------------------------------- Hydra

# A value with none of Hydra's override syntax: no sweep, list, dict, call, quote or escape.
_PLAIN_VALUE = re.compile(r"[^,\[\]{}()'\"\\]+")


def quote_non_ascii(argv: Sequence[str]) -> list[str]:
    """``argv`` with each plain override value that has non-ASCII characters quoted
    (``data.root=/data/données`` -> ``data.root="/data/données"``): Hydra's grammar takes
    only ASCII letters unquoted, and a path is the user's to name."""
    quoted = []
    for arg in argv:
        key, equals, value = arg.partition("=")
        plain = equals and not arg.startswith("-") and _PLAIN_VALUE.fullmatch(value)
        if plain and not value.isascii():
            arg = f'{key}="{value}"'
        quoted.append(arg)
    return quoted


@contextmanager
def hydra_errors_in_one_line() -> Iterator[None]:
    """Hydra's own refusals before a job starts (an unknown option, a key set without ``+``,
    bad override syntax) raised as a one-line UserError instead of printed over several."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing
    try:
        yield
    except (ConfigCompositionException, OverrideParseException) as err:
        raise UserError(hydra_error_line(err)) from None
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def hydra_error_line(err: BaseException) -> str:
    """Hydra's multi-line message (and its OmegaConf cause) as one line."""
    text = str(err).split("Config search path:")[0]
    if err.__cause__ is not None:
        text += "\n" + str(err.__cause__)
    lines = [line.strip() for line in text.splitlines()]
    noise = ("Error when parsing index", "full_key:", "object_type=")
    parts: list[str] = []
    listing = False
    for line in lines:
        if not line or line.startswith(noise):
            continue
        if listing and not line.endswith(":") and " " not in line:  # one option of a list
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line
            continue
        listing = line.endswith(":")
        parts.append(line.rstrip("."))
    return "; ".join(parts)
