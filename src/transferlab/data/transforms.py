"""Train and eval transforms built from the backbone's timm data config."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.constants import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import MaybeToTensor, ToTensor, str_to_interp_mode
from torchvision import transforms as T

from transferlab.errors import UserError

Transform = Callable[[Any], Any]

DEFAULT_DATA_CONFIG: dict[str, Any] = {
    "input_size": (3, 224, 224),
    "interpolation": "bilinear",
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "crop_pct": DEFAULT_CROP_PCT,
    "crop_mode": "center",
}
IMAGE_MODES = {1: "L", 3: "RGB"}


def resolve_data_config(
    data_config: Mapping[str, Any] | None, image_size: int | None = None
) -> dict[str, Any]:
    """A complete data config: timm defaults, then ``data_config``, then ``image_size`` as H and W."""
    config = {**DEFAULT_DATA_CONFIG, **dict(data_config or {})}
    channels, height, width = (int(v) for v in config["input_size"])
    if channels not in IMAGE_MODES:
        raise ValueError(
            f"input_size {tuple(config['input_size'])}: only 1 or 3 channels are supported"
        )
    if image_size is not None:
        if int(image_size) < 1:
            raise UserError(f"data.image_size={image_size} must be a positive number of pixels")
        height = width = int(image_size)
    config["input_size"] = (channels, height, width)
    for key in ("mean", "std"):
        values = tuple(float(v) for v in config[key])
        if len(values) != channels:
            # A 1-channel backbone adapted from RGB weights sees gray as R = G = B.
            values = (sum(values) / len(values),) * channels
        config[key] = values
    config["crop_pct"] = float(config["crop_pct"] or DEFAULT_CROP_PCT)
    return config


def image_mode(data_config: Mapping[str, Any]) -> str:
    """The PIL mode the backbone wants: ``L`` for 1 channel, ``RGB`` for 3."""
    return IMAGE_MODES[int(data_config["input_size"][0])]


class ToNormalizedTensor:
    """``ToTensor`` then ``Normalize`` in one numpy pass: the same float32 values, faster.

    torchvision's pair runs about ten small tensor operations per image; for small images
    (Fashion-MNIST at 64 px) one numpy pass makes the whole per-image pipeline about 10%
    faster (docs/performance.md).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        x = pixels.transpose(2, 0, 1).astype(np.float32)
        x /= np.float32(255)
        x -= self.mean
        x /= self.std
        return torch.from_numpy(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean.ravel()}, std={self.std.ravel()})"


def fuse_to_tensor(transform: Transform) -> Transform:
    """``transform`` with each to-tensor step followed by ``Normalize`` fused into one."""
    if not isinstance(transform, T.Compose):
        return transform
    steps: list[Any] = []
    for step in transform.transforms:
        previous = steps[-1] if steps else None
        if isinstance(step, T.Normalize) and isinstance(
            previous, (T.ToTensor, ToTensor, MaybeToTensor)
        ):
            steps[-1] = ToNormalizedTensor(
                torch.as_tensor(step.mean).tolist(), torch.as_tensor(step.std).tolist()
            )
        else:
            steps.append(step)
    return T.Compose(steps)


def create_eval_transform(data_config: Mapping[str, Any]) -> Transform:
    """Resize to size / crop_pct, center crop, to tensor, normalize (timm's eval transform)."""
    return fuse_to_tensor(_timm_eval_transform(data_config))


def _timm_eval_transform(data_config: Mapping[str, Any]) -> Transform:
    return create_transform(
        input_size=tuple(data_config["input_size"]),
        is_training=False,
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"),
    )


def _none(data_config: Mapping[str, Any], options: Mapping[str, Any]) -> Transform:
    return create_eval_transform(data_config)


def _basic(data_config: Mapping[str, Any], options: Mapping[str, Any]) -> Transform:
    return T.Compose(
        [
            T.RandomResizedCrop(
                data_config["input_size"][1:],
                scale=options["scale"],
                interpolation=str_to_interp_mode(data_config["interpolation"]),
            ),
            T.RandomHorizontalFlip(options["hflip"]),
            T.RandomRotation(options["rotation"]),
            T.ToTensor(),
            T.Normalize(data_config["mean"], data_config["std"]),
        ]
    )


def _randaugment(data_config: Mapping[str, Any], options: Mapping[str, Any]) -> Transform:
    return create_transform(
        input_size=tuple(data_config["input_size"]),
        is_training=True,
        scale=options["scale"],
        hflip=options["hflip"],
        auto_augment=options["auto_augment"],
        interpolation=data_config["interpolation"],
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
    )


AUGMENTS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], Transform]] = {
    "none": _none,
    "basic": _basic,
    "randaugment": _randaugment,
}
AUGMENT_DEFAULTS: dict[str, Any] = {
    "scale": (0.7, 1.0),
    "hflip": 0.5,
    "rotation": 10.0,
    "auto_augment": "rand-m9-mstd0.5",
}


def augment_name(augment: Mapping[str, Any] | None) -> str:
    """The augment's ``name``, checked against the registry (``none`` when not given)."""
    name = str((augment or {}).get("name", "none"))
    if name not in AUGMENTS:
        raise UserError(
            f"unknown augment name {name!r}; choose augment.name from: {', '.join(AUGMENTS)}"
        )
    return name


def create_train_transform(
    data_config: Mapping[str, Any], augment: Mapping[str, Any] | None
) -> Transform:
    """The train transform: the eval one for ``none``, else ``basic`` or ``randaugment`` options."""
    name = augment_name(augment)
    options = {k: v for k, v in dict(augment or {}).items() if k != "name"}
    unknown = sorted(set(options) - set(AUGMENT_DEFAULTS))
    if unknown:
        raise UserError(
            f"unknown augment option(s) {', '.join(unknown)}; known: name, {', '.join(AUGMENT_DEFAULTS)}"
        )
    options = {**AUGMENT_DEFAULTS, **options}
    options["scale"] = tuple(float(v) for v in options["scale"])
    options["hflip"] = float(options["hflip"])
    options["rotation"] = float(options["rotation"])
    return fuse_to_tensor(AUGMENTS[name](data_config, options))
