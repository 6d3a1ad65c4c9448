"""Data sources: each returns the raw splits of one dataset (train pool, optional val/test, class names).

A source is a function registered in ``SOURCES`` under its config name; it takes the keyword
arguments ``root`` (a folder or None) and ``download`` and returns a ``RawSplits``. Splitting,
few-shot sampling and transforms are the DataModule's business, not the source's.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps

from transferlab.errors import UserError

# What PIL raises on a file it cannot identify or decode (UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class UnreadableImageError(UserError):
    """An image that fails to decode; stays one line when a DataLoader worker re-raises it.

    torch re-raises a worker's exception as ``type(exc)(text with the worker's traceback)``;
    the last line of that text is this error's own one-line message.
    """

    def __init__(self, message: str) -> None:
        last = message.strip().splitlines()[-1] if message.strip() else message
        marker = f"{type(self).__name__}: "
        super().__init__(last.split(marker, 1)[1] if marker in last else message)


class ImageSet(Protocol):
    """A labelled set of images, in memory or on disk."""

    labels: np.ndarray

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image:
        """The image at ``index`` as PIL decoded it (any mode, any size)."""
        ...

    def update_hash(self, digest: hashlib._Hash, indices: np.ndarray) -> None:
        """Feed the identity of the images at ``indices`` into ``digest``."""
        ...


@dataclass(frozen=True, eq=False)
class ArrayImages:
    """Images held in memory: a uint8 array (N, H, W) or (N, H, W, C) and int labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise ValueError(
                f"expected uint8 (N,H,W[,C]) images, got {self.images.dtype} {self.images.shape}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        pixels = self.images[index]
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[..., 0]
        return Image.fromarray(pixels)

    def update_hash(self, digest: hashlib._Hash, indices: np.ndarray) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        digest.update(indices.tobytes())
        digest.update(self.labels[indices].tobytes())
        for start in range(0, len(indices), 8192):
            digest.update(np.ascontiguousarray(self.images[indices[start : start + 8192]]).data)


@dataclass(frozen=True, eq=False)
class FileImages:
    """Images on disk: paths and int labels; ``root`` makes the fingerprint machine-independent."""

    paths: tuple[Path, ...]
    labels: np.ndarray
    root: Path

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return ImageOps.exif_transpose(image)  # decodes; returns a new image
        except IMAGE_ERRORS as exc:
            raise UnreadableImageError(
                f"cannot decode image {path} ({type(exc).__name__}: {_one_line(exc)}): remove or replace it"
            ) from exc

    def update_hash(self, digest: hashlib._Hash, indices: np.ndarray) -> None:
        for index in np.asarray(indices, dtype=np.int64):
            path = self.paths[index]
            name = path.relative_to(self.root) if path.is_relative_to(self.root) else path
            digest.update(f"{name.as_posix()}\0{self.labels[index]}\0".encode())


@dataclass(frozen=True)
class RawSplits:
    """What a source provides: a train pool, optional val and test sets, and the class names."""

    train: ImageSet
    val: ImageSet | None
    test: ImageSet | None
    class_names: tuple[str, ...]


SourceFn = Callable[..., RawSplits]
SOURCES: dict[str, SourceFn] = {}


def register_source(name: str) -> Callable[[SourceFn], SourceFn]:
    """Register a source function under ``name`` (its ``data.source`` value)."""

    def add(fn: SourceFn) -> SourceFn:
        SOURCES[name] = fn
        return fn

    return add


def load_source(
    name: str, *, root: str | os.PathLike | None = None, download: bool = True
) -> RawSplits:
    """Run the source registered as ``name``."""
    if name not in SOURCES:
        raise UserError(
            f"unknown data source {name!r}; choose data.source from: {', '.join(sorted(SOURCES))}"
        )
    folder = Path(root).expanduser() if root not in (None, "") else None
    return SOURCES[name](root=folder, download=download)


def data_cache_dir() -> Path:
    """Where downloads go: ``$TRANSFERLAB_DATA`` or ``~/.cache/transferlab``."""
    env = os.environ.get("TRANSFERLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "transferlab"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# ----------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file of unsigned bytes (MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path} ({_one_line(exc)}): replace the file") from exc
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise UserError(f"{path} is not an idx file of unsigned bytes: replace the file")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise UserError(f"{path} is truncated or padded (header says {shape}): replace the file")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def find_idx_files(folder: Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST idx files in ``folder`` or torchvision's ``folder/FashionMNIST/raw``."""
    for candidate in (folder, folder / "FashionMNIST" / "raw"):
        found = {}
        for key, stem in FASHION_MNIST_FILES.items():
            path = next(
                (p for p in (candidate / stem, candidate / f"{stem}.gz") if p.is_file()), None
            )
            if path is None:
                break
            found[key] = path
        else:
            return found
    return None


@register_source("fashion_mnist")
def fashion_mnist(root: Path | None = None, download: bool = True) -> RawSplits:
    """Fashion-MNIST (60k train pool, 10k test): ``root``, the Debian copy, the cache, then a download."""
    cache = data_cache_dir() / "fashion-mnist"
    places = [*([root] if root else []), SYSTEM_FASHION_MNIST, cache]
    files = next((f for f in map(find_idx_files, places) if f), None)
    failure = "data.download=false"
    if files is None and download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(cache), train=True, download=True)
            files = find_idx_files(cache)
        except (OSError, RuntimeError, ValueError) as exc:
            failure = f"the download failed ({type(exc).__name__})"
    if files is None:
        where = ", ".join(str(p) for p in places)
        raise UserError(
            f"Fashion-MNIST not found in {where} and {failure}: run `apt-get install "
            "dataset-fashion-mnist` or put the four idx .gz files in data.root=DIR"
        )
    arrays = {key: read_idx(path) for key, path in files.items()}
    return RawSplits(
        train=ArrayImages(arrays["train_images"], arrays["train_labels"]),
        val=None,
        test=ArrayImages(arrays["test_images"], arrays["test_labels"]),
        class_names=FASHION_MNIST_CLASSES,
    )


# ----------------------------------------------------------------------------- digits


@register_source("digits")
def digits(root: Path | None = None, download: bool = True) -> RawSplits:
    """scikit-learn's 1,797 8x8 digits, scaled from 0..16 to uint8 0..255; no val or test split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return RawSplits(
        train=ArrayImages(images, bunch.target),
        val=None,
        test=None,
        class_names=tuple(str(name) for name in bunch.target_names),
    )


# ----------------------------------------------------------------------------- image folders

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
VAL_DIR_NAMES = ("val", "valid", "validation")


def _class_dirs(folder: Path) -> list[Path]:
    dirs = _subfolders(folder)
    if not dirs:
        raise UserError(
            f"{folder} has no class sub-folders: put the images in {folder}/<class>/*.jpg"
        )
    return dirs


def _image_files(class_dir: Path) -> list[Path]:
    files = sorted(p for p in class_dir.rglob("*") if _is_image_file(p))
    if not files:
        raise _no_images(class_dir)
    return files


def _no_images(class_dir: Path) -> UserError:
    return UserError(
        f"class folder {class_dir} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
        "add images or remove the folder"
    )


def _scan(folder: Path, class_names: Sequence[str], root: Path) -> FileImages:
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        files = _image_files(folder / name)
        paths += files
        labels += [label] * len(files)
    return FileImages(tuple(paths), np.asarray(labels, dtype=np.int64), root)


def _check_same_classes(split: str, folder: Path, names: list[str], train_names: list[str]) -> None:
    missing = sorted(set(train_names) - set(names))
    extra = sorted(set(names) - set(train_names))
    if missing or extra:
        parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has extra {', '.join(extra)}"] if extra else []
        )
        raise UserError(
            f"classes differ between splits: {split} ({folder}) {' and '.join(parts)} compared to train; "
            "every split needs the same class folders"
        )


def check_image_headers(paths: Sequence[Path]) -> None:
    """Open every file's header (no decoding); a file PIL cannot identify is a UserError."""
    for path in paths:
        try:
            with Image.open(path):
                pass
        except IMAGE_ERRORS as exc:
            raise UserError(
                f"unreadable image {path} ({type(exc).__name__}): remove or replace the file"
            ) from exc


def image_folder_layout(root: Path | None) -> tuple[Path, list[str]]:
    """The folder of training classes (``root`` or ``root/train``) and the class names.

    Reads folder names only (no image is opened), so it runs before torch loads; a layout
    that cannot be trained on (no folder, no or one class, classes one level deeper, a
    class without images) is a UserError saying what to change.
    """
    if root is None:
        raise UserError(
            "data.source=image_folder needs data.root=DIR: a folder of class sub-folders"
        )
    if not root.is_dir():
        raise UserError(
            f"data.root={root} does not exist; point data.root at a folder of class sub-folders"
        )
    train_dir = root / "train" if (root / "train").is_dir() else root
    class_dirs = _class_dirs(train_dir)
    if len(class_dirs) == 1:
        (only,) = class_dirs
        nested = [d for d in _subfolders(only) if _first_image(d) is not None]
        if len(nested) >= 2 and train_dir == root:
            raise UserError(
                f"{root} has one folder ({only.name}), but the classes seem to be in {only}: "
                f"set data.root={only}"
            )
        if len(nested) >= 2:
            raise UserError(
                f"{train_dir} has one folder ({only.name}), but the classes seem to be in "
                f"{only}: move its class folders up into {train_dir}"
            )
        raise UserError(
            f"{train_dir} has one class folder ({only.name}): classification needs two or "
            f"more, one sub-folder of images per class"
        )
    for class_dir in class_dirs:
        if _first_image(class_dir) is None:
            raise _no_images(class_dir)
    return train_dir, [d.name for d in class_dirs]


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _is_image_file(path: Path) -> bool:
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def _first_image(folder: Path) -> Path | None:
    return next((p for p in folder.rglob("*") if _is_image_file(p)), None)


@register_source("image_folder")
def image_folder(root: Path | None = None, download: bool = True) -> RawSplits:
    """``root/<class>/*.jpg``, or ``root/{train,val,test}/<class>/*.jpg`` when ``root/train`` exists."""
    train_dir, names = image_folder_layout(root)
    if train_dir == root:
        splits = {"train": _scan(root, names, root)}
    else:
        split_dirs = {"train": train_dir}
        val_dir = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
        if val_dir is not None:
            split_dirs["val"] = val_dir
        if (root / "test").is_dir():
            split_dirs["test"] = root / "test"
        for split, folder in split_dirs.items():
            _check_same_classes(split, folder, [d.name for d in _class_dirs(folder)], names)
        splits = {split: _scan(folder, names, root) for split, folder in split_dirs.items()}
    for images in splits.values():
        check_image_headers(images.paths)
    return RawSplits(
        train=splits["train"],
        val=splits.get("val"),
        test=splits.get("test"),
        class_names=tuple(names),
    )


# ----------------------------------------------------------------------------- CIFAR-10


@register_source("cifar10")
def cifar10(root: Path | None = None, download: bool = True) -> RawSplits:
    """CIFAR-10 through torchvision (50k train pool, 10k test), downloaded into the cache when online."""
    from torchvision.datasets import CIFAR10

    folder = root or data_cache_dir() / "cifar10"
    try:
        train = CIFAR10(str(folder), train=True, download=download)
        test = CIFAR10(str(folder), train=False, download=download)
    except (OSError, RuntimeError) as exc:
        failure = (
            f"the download failed ({type(exc).__name__})" if download else "data.download=false"
        )
        raise UserError(
            f"CIFAR-10 not found in {folder} and {failure}: go online with data.download=true, or put "
            "cifar-10-python.tar.gz (or its cifar-10-batches-py folder) in data.root=DIR"
        ) from exc
    return RawSplits(
        train=ArrayImages(np.asarray(train.data), np.asarray(train.targets)),
        val=None,
        test=ArrayImages(np.asarray(test.data), np.asarray(test.targets)),
        class_names=tuple(train.classes),
    )
