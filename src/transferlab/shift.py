"""Corrupting evaluation images: the ImageNet-C-style corruption suite (domain shift).

Each corruption maps a uint8 ``HxWx3`` image and a severity (1-5) to a corrupted image of
the same shape. Most come from ``imagecorruptions`` (Hendrycks & Dietterich's ImageNet-C
code, packaged by Michaelis et al.); ``rotate`` is torchvision's affine warp. Corruptions
draw their randomness from numpy's global ``RandomState`` only, which ``Corruption`` seeds
per image from (seed, corruption, severity, the image's pixels) and restores afterwards:
the same image gets the same pixels whatever the image order or the loader process.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from PIL import Image

from transferlab.errors import UserError

CorruptionFn = Callable[[np.ndarray, int], np.ndarray]

CORRUPTION_FUNCTIONS: dict[str, CorruptionFn] = {}
# The default suite: ImageNet-C's noise, blur and digital corruptions, with gaussian_blur for
# glass_blur (its numba kernel compiles for seconds in every process) and zoom_blur, plus
# rotate. The weather ones (snow, frost, fog, spatter) and the rest are registered extras.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "gaussian_blur",
    "motion_blur",
    "contrast",
    "brightness",
    "jpeg_compression",
    "pixelate",
    "elastic_transform",
    "rotate",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
# imagecorruptions' documented minimum side; below it its blur kernels cover the image.
# The corruptions that move pixels: a task whose targets are per pixel (segmentation) would
# score the moved image against its unmoved mask, so these are left out for it.
GEOMETRIC = frozenset({"elastic_transform", "rotate"})
MIN_SIDE = 32
IMAGE_MODES = ("RGB", "L")


def register_corruption(name: str) -> Callable[[CorruptionFn], CorruptionFn]:
    """Register ``fn(pixels, severity) -> pixels`` under ``name`` (a ``shift.corruptions`` value).

    ``pixels`` is uint8 ``HxWx3``; randomness must come from numpy's global ``RandomState``
    (``np.random.*``), which ``Corruption`` seeds per image.
    """

    def add(fn: CorruptionFn) -> CorruptionFn:
        CORRUPTION_FUNCTIONS[name] = fn
        return fn

    return add


def _imagecorruptions(name: str, seeded: bool = False) -> CorruptionFn:
    """The ``imagecorruptions`` function ``name``; ``seeded`` ones take a ``seed`` argument
    (their own generator, else fresh OS entropy), drawn here from numpy's global state."""

    def corrupt(pixels: np.ndarray, severity: int) -> np.ndarray:
        import imagecorruptions

        # corruption_dict rather than corrupt(): corrupt() truncates the float result to
        # uint8 and refuses sides under 32 px; to_uint8 rounds and MIN_SIDE is checked once.
        fn = imagecorruptions.corruption_dict[name]
        extra = {"seed": int(np.random.randint(2**31))} if seeded else {}
        return to_uint8(fn(Image.fromarray(pixels), severity, **extra), pixels.shape, name)

    corrupt.__name__ = name
    corrupt.__qualname__ = name
    return corrupt


# scikit-image's salt-and-pepper and the numba glass blur ignore numpy's global state.
_SEEDED = ("impulse_noise", "glass_blur")
for _name in (
    *(name for name in CORRUPTIONS if name != "rotate"),
    # Extras, not in the default suite.
    "speckle_noise",
    "zoom_blur",
    "glass_blur",
    "snow",
    "frost",
    "fog",
    "spatter",
    "saturate",
):
    register_corruption(_name)(_imagecorruptions(_name, seeded=_name in _SEEDED))

# rotate, per severity 1..5: the angle in degrees (its sign at random), and the largest
# translation (fraction of width and height, uniform in +-) and scale change (uniform in
# 1 +- s). Uncovered corners are black.
#   severity             1     2     3     4     5
#   degrees              6    12    18    24    30
#   translate (+-)    0.02  0.04  0.06  0.08  0.10
#   scale (1 +-)      0.02  0.04  0.06  0.08  0.10
ROTATE_DEGREES = (6.0, 12.0, 18.0, 24.0, 30.0)
ROTATE_TRANSLATE = (0.02, 0.04, 0.06, 0.08, 0.10)
ROTATE_SCALE = (0.02, 0.04, 0.06, 0.08, 0.10)


@register_corruption("rotate")
def rotate(pixels: np.ndarray, severity: int) -> np.ndarray:
    """A bilinear rotation with a little translation and scaling (table above)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    height, width = pixels.shape[:2]
    i = severity - 1
    angle = ROTATE_DEGREES[i] * (1.0 if np.random.rand() < 0.5 else -1.0)
    shift = ROTATE_TRANSLATE[i]
    translate = [
        float(np.random.uniform(-shift, shift) * width),
        float(np.random.uniform(-shift, shift) * height),
    ]
    scale = float(1.0 + np.random.uniform(-ROTATE_SCALE[i], ROTATE_SCALE[i]))
    warped = F.affine(
        Image.fromarray(pixels),
        angle=angle,
        translate=translate,
        scale=scale,
        shear=[0.0, 0.0],
        interpolation=InterpolationMode.BILINEAR,
        fill=0,
    )
    return to_uint8(warped, pixels.shape, "rotate")


def to_uint8(image: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A corruption's output (float or uint8 array, or PIL image) as uint8 of ``shape``."""
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        pixels = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    if pixels.ndim == 2 and len(shape) == 3:  # a gray result for a colour image
        pixels = np.repeat(pixels[:, :, None], shape[2], axis=2)
    if pixels.shape != tuple(shape):
        raise RuntimeError(
            f"corruption {name} returned an image of shape {pixels.shape} for {tuple(shape)}"
        )
    return pixels


def corruption_names() -> list[str]:
    """Every registered corruption: the default suite first, then the extras."""
    return [*CORRUPTIONS, *(name for name in CORRUPTION_FUNCTIONS if name not in CORRUPTIONS)]


def check_corruptions(names: Iterable[str]) -> list[str]:
    """``names`` without repeats, each a registered corruption, else a one-line UserError."""
    checked = list(dict.fromkeys(str(name).strip() for name in names))
    for name in checked:
        if name not in CORRUPTION_FUNCTIONS:
            raise UserError(
                f"unknown corruption {name!r}; choose shift.corruptions from: "
                f"{', '.join(corruption_names())}"
            )
    return checked


def check_severities(severities: Iterable[int | str]) -> list[int]:
    """``severities`` as ints without repeats, each 1..5, else a one-line UserError."""
    checked: list[int] = []
    for value in severities:
        text = str(value).strip()
        if not text.isdigit() or int(text) not in SEVERITIES:
            raise UserError(
                f"corruption severity {value!r} is not one of "
                f"{', '.join(map(str, SEVERITIES))}; set shift.severities to a list of them"
            )
        if int(text) not in checked:
            checked.append(int(text))
    return checked


_numpy_state = threading.Lock()  # one global RandomState: one seeded corruption at a time


@contextlib.contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """numpy's global RandomState seeded with ``seed`` (any size of int) inside, restored after."""
    words = np.frombuffer((int(seed) % 2**128).to_bytes(16, "little"), dtype=np.uint32)
    with _numpy_state:
        saved = np.random.get_state()
        np.random.seed(words)
        try:
            yield
        finally:
            np.random.set_state(saved)


def image_seed(pixels: np.ndarray, name: str, severity: int, seed: int) -> int:
    """A 128-bit seed for one image: from the suite's ``seed``, the corruption and the pixels."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{int(seed)}|{name}|{int(severity)}|{pixels.shape}|".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return int.from_bytes(digest.digest(), "little")


def corrupt_pixels(pixels: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """``pixels`` (uint8 ``HxWx3``) corrupted, the same for the same pixels, name, severity, seed."""
    (name,) = check_corruptions([name])
    (severity,) = check_severities([severity])
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3 pixels, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    if min(height, width) < MIN_SIDE:
        raise UserError(
            f"corruption {name} needs images of at least {MIN_SIDE}x{MIN_SIDE} pixels, got "
            f"{width}x{height}; set data.image_size to {MIN_SIDE} or more"
        )
    with seeded_numpy(image_seed(pixels, name, severity, seed)):
        corrupted = CORRUPTION_FUNCTIONS[name](pixels, severity)
    return to_uint8(corrupted, pixels.shape, name)


class Corruption:
    """PIL image -> the same image (mode and size) corrupted; deterministic for ``seed``."""

    def __init__(self, name: str, severity: int, seed: int) -> None:
        (self.name,) = check_corruptions([name])
        (self.severity,) = check_severities([severity])
        self.seed = int(seed)

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.mode not in IMAGE_MODES:
            raise ValueError(
                f"Corruption takes {' or '.join(IMAGE_MODES)} images, got mode {image.mode}"
            )
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        corrupted = Image.fromarray(corrupt_pixels(pixels, self.name, self.severity, self.seed))
        return corrupted if image.mode == "RGB" else corrupted.convert(image.mode)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, severity={self.severity}, seed={self.seed})"
        )


def with_corruption(eval_transform: Any, name: str, severity: int, seed: int) -> Any:
    """``eval_transform`` (a ``Compose`` ending in to-tensor + normalise) with the corruption
    inserted just before its tensor step: after resizing and cropping, before normalisation."""
    from timm.data.transforms import MaybeToTensor, ToTensor
    from torchvision import transforms as T

    from transferlab.data.transforms import ToNormalizedTensor

    tensor_steps = (ToNormalizedTensor, T.ToTensor, T.PILToTensor, ToTensor, MaybeToTensor)
    steps = list(getattr(eval_transform, "transforms", None) or [])
    if not isinstance(eval_transform, T.Compose) or not steps:
        raise TypeError(
            "with_corruption needs a torchvision Compose of PIL steps ending in a to-tensor "
            f"step (create_eval_transform's), got {type(eval_transform).__name__}"
        )
    at = next((i for i, step in enumerate(steps) if isinstance(step, tensor_steps)), None)
    if at is None:
        raise TypeError(
            "with_corruption: the eval transform has no to-tensor step to insert the "
            f"corruption before: {eval_transform!r}"
        )
    steps.insert(at, Corruption(name, severity, seed))
    return T.Compose(steps)
