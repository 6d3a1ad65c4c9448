"""Segmentation data: image/mask sets, generated Fashion-MNIST scenes, and a user folder layout.

A segmentation source returns ``(train, val, test, class_names)``: three ``MaskedImages`` (an
image and a mask of class indices per item) and the class names, index 0 first. Pixels labelled
``IGNORE_INDEX`` (255) belong to no class and are left out of losses and metrics.
"""

from __future__ import annotations

import colorsys
import hashlib
import logging
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from transferlab.data.datasets import decode_rgb
from transferlab.data.sources import (
    FASHION_MNIST_CLASSES,
    IMAGE_ERRORS,
    VAL_DIR_NAMES,
    RawSplits,
    UnreadableImageError,
    _one_line,
    fashion_mnist,
)
from transferlab.data.splits import check_fractions
from transferlab.errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = 255


class MaskedImages(Protocol):
    """Images with a mask of class indices each, in memory or on disk."""

    class_names: tuple[str, ...]

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The RGB image at ``index`` and its (H, W) int64 mask of class indices."""
        ...

    def update_hash(self, digest: hashlib._Hash, indices: np.ndarray) -> None:
        """Feed the identity of the images and masks at ``indices`` into ``digest``."""
        ...


@dataclass(frozen=True, eq=False)
class MaskedArrays:
    """Images and masks in memory: uint8 (N, H, W, 3) images and integer (N, H, W) masks.

    ``items`` optionally records where each scene's content came from (for generated data:
    the Fashion-MNIST indices pasted into it, -1 padded); ``instances`` optionally which item
    each pixel shows (k: the item ``items[:, k - 1]``, 0: none).
    """

    images: np.ndarray
    masks: np.ndarray
    class_names: tuple[str, ...]
    items: np.ndarray | None = None
    instances: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[3] != 3:
            raise ValueError(
                f"expected uint8 (N,H,W,3) images, got {self.images.dtype} {self.images.shape}"
            )
        if self.masks.shape != self.images.shape[:3]:
            raise ValueError(f"masks {self.masks.shape} do not match images {self.images.shape}")
        if not np.issubdtype(self.masks.dtype, np.integer):
            raise ValueError(f"expected integer masks, got {self.masks.dtype}")
        if self.instances is not None and self.instances.shape != self.masks.shape:
            raise ValueError(
                f"instances {self.instances.shape} do not match masks {self.masks.shape}"
            )
        object.__setattr__(self, "class_names", tuple(self.class_names))

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        return Image.fromarray(self.images[index]), self.masks[index].astype(np.int64)

    def update_hash(self, digest: hashlib._Hash, indices: np.ndarray) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        digest.update(indices.tobytes())
        for start in range(0, len(indices), 4096):
            chunk = indices[start : start + 4096]
            digest.update(np.ascontiguousarray(self.images[chunk]).data)
            digest.update(np.ascontiguousarray(self.masks[chunk]).data)


@dataclass(frozen=True, eq=False)
class MaskedFiles:
    """Image and mask files on disk; ``mask_digests`` (from the scan) put mask content in the hash."""

    image_paths: tuple[Path, ...]
    mask_paths: tuple[Path, ...]
    class_names: tuple[str, ...]
    root: Path
    mask_digests: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if len(self.image_paths) != len(self.mask_paths):
            raise ValueError(f"{len(self.image_paths)} images but {len(self.mask_paths)} masks")
        object.__setattr__(self, "class_names", tuple(self.class_names))

    def __len__(self) -> int:
        return len(self.image_paths)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        path = self.image_paths[index]
        rgb = decode_rgb(path)
        return rgb, read_mask(self.mask_paths[index]).astype(np.int64)

    def update_hash(self, digest: hashlib._Hash, indices: np.ndarray) -> None:
        for index in np.asarray(indices, dtype=np.int64):
            for path in (self.image_paths[index], self.mask_paths[index]):
                name = path.relative_to(self.root) if path.is_relative_to(self.root) else path
                digest.update(f"{name.as_posix()}\0".encode())
            if self.mask_digests:
                digest.update(self.mask_digests[index])

    def subset(self, indices: np.ndarray) -> MaskedFiles:
        """The files at ``indices``, in that order."""
        pick = np.asarray(indices, dtype=np.int64)
        return MaskedFiles(
            tuple(self.image_paths[i] for i in pick),
            tuple(self.mask_paths[i] for i in pick),
            self.class_names,
            self.root,
            tuple(self.mask_digests[i] for i in pick) if self.mask_digests else (),
        )


Splits = tuple[MaskedImages, MaskedImages, MaskedImages, tuple[str, ...]]

# ----------------------------------------------------------------------------- Fashion-MNIST scenes

SCENES_FORMAT = 1
SCENE_PHOTOS = (
    "brick",
    "grass",
    "gravel",
    "camera",
    "coffee",
    "astronaut",
    "chelsea",
    "rocket",
    "coins",
)
SCENE_CLASSES = ("background", *FASHION_MNIST_CLASSES)
ITEMS_PER_SCENE = (2, 5)
ITEM_THRESHOLD = 20
SPLIT_KEYS = ("train", "val", "test")
SCENE_ARRAYS = tuple(f"{key}_{part}" for key in SPLIT_KEYS for part in ("images", "masks", "items"))
SCENE_INSTANCES = tuple(f"{key}_instances" for key in SPLIT_KEYS)


def fmnist_scenes(
    seed: int = 0,
    train_scenes: int = 400,
    val_scenes: int = 100,
    test_scenes: int = 200,
    size: int = 128,
    cache_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    download: bool = True,
    with_instances: bool = False,
) -> tuple[MaskedArrays, MaskedArrays, MaskedArrays, tuple[str, ...]]:
    """Seeded scenes of 2-5 Fashion-MNIST items on crops of scikit-image's photographs.

    Each item (28x28, scaled to 3/16-1/2 of ``size``: 24-64 px at 128) is pasted at a random
    place in a random colour (its own gray levels kept as shading), later items covering
    earlier ones; the mask holds class + 1 where the scaled item is above 20, 0 elsewhere.
    Colours do not depend on the class, so a model has to learn shapes. Train and val scenes
    use disjoint items of the official training images, test scenes items of the test images
    only; ``items`` on each split records the Fashion-MNIST indices used (-1 padded).

    The defaults (400/100/200 scenes at 128 px, about 34 MB in memory) keep a default run near
    five minutes on two CPU cores. Generated once (about 3 s) and cached as a compressed
    ``.npz`` under ``cache_dir`` (default ``$XDG_CACHE_HOME/transferlab/fmnist_scenes``, or
    ``$TRANSFERLAB_DATA/fmnist_scenes`` when that is set); a corrupt cache file is regenerated.
    ``root`` and ``download`` find Fashion-MNIST as the ``fashion_mnist`` source does.
    ``with_instances``: every split carries its ``instances`` maps (a cache written before
    they were stored is regenerated, to the same images and masks).
    """
    counts = {"train": train_scenes, "val": val_scenes, "test": test_scenes}
    for key, count in counts.items():
        if int(count) < 1:
            raise UserError(f"fmnist_scenes {key}_scenes={count} must be at least 1")
    if int(size) < 32:
        raise UserError(f"data.image_size={size} is too small for fmnist_scenes: use 32 or more")
    path = scenes_cache_path(seed, counts, size, cache_dir)
    required = SCENE_ARRAYS + (SCENE_INSTANCES if with_instances else ())
    arrays = _read_scenes(path, counts, size, required)
    if arrays is None:
        source = fashion_mnist(root=Path(root).expanduser() if root else None, download=download)
        arrays = _generate_scenes(int(seed), counts, int(size), source)
        _write_scenes(path, arrays)
    splits = [
        MaskedArrays(
            arrays[f"{key}_images"],
            arrays[f"{key}_masks"],
            SCENE_CLASSES,
            arrays[f"{key}_items"],
            arrays.get(f"{key}_instances"),
        )
        for key in SPLIT_KEYS
    ]
    return splits[0], splits[1], splits[2], SCENE_CLASSES


def scenes_cache_path(
    seed: int, counts: dict[str, int], size: int, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The cache file for these parameters: every parameter and the format are in its name."""
    if cache_dir is not None:
        folder = Path(cache_dir).expanduser()
    elif os.environ.get("TRANSFERLAB_DATA"):
        folder = Path(os.environ["TRANSFERLAB_DATA"]).expanduser() / "fmnist_scenes"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        folder = Path(base).expanduser() / "transferlab" / "fmnist_scenes"
    n = "-".join(str(int(counts[key])) for key in SPLIT_KEYS)
    return folder / f"fmnist_scenes_v{SCENES_FORMAT}_seed{int(seed)}_n{n}_s{int(size)}.npz"


def _read_scenes(
    path: Path, counts: dict[str, int], size: int, required: Sequence[str] = SCENE_ARRAYS
) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing, corrupt or of other parameters."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        missing = sorted(set(required) - set(arrays))
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        for key in SPLIT_KEYS:
            images, masks = arrays[f"{key}_images"], arrays[f"{key}_masks"]
            expected = (int(counts[key]), int(size), int(size))
            if images.shape != (*expected, 3) or masks.shape != expected:
                raise ValueError(f"{key} arrays have shape {images.shape}, expected {expected}")
            instances = arrays.get(f"{key}_instances")
            if instances is not None and instances.shape != expected:
                raise ValueError(
                    f"{key} instances have shape {instances.shape}, expected {expected}"
                )
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        log.warning("Regenerating the corrupt scene cache %s (%s)", path, _one_line(exc))
        return None
    return arrays


def _write_scenes(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically; a cache that cannot be written only costs the next run a regeneration."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as file:
            np.savez_compressed(file, **arrays)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        log.warning("Cannot cache the generated scenes at %s (%s)", path, _one_line(exc))


def _generate_scenes(
    seed: int, counts: dict[str, int], size: int, source: RawSplits
) -> dict[str, np.ndarray]:
    """Every split's images, masks, item indices and instance maps, from the seed alone."""
    photos = scene_photos()
    pools = {"train": source.train, "val": source.train, "test": source.test}
    orders = {
        "train": np.random.default_rng((seed, 0)).permutation(len(source.train)),
        "test": np.random.default_rng((seed, 1)).permutation(len(source.test)),
    }
    orders["val"] = orders["train"]  # val continues where train stopped: disjoint items
    start = {"train": 0, "val": 0, "test": 0}
    arrays: dict[str, np.ndarray] = {}
    for split_id, key in enumerate(SPLIT_KEYS):
        rng = np.random.default_rng((seed, 2 + split_id))
        per_scene = rng.integers(ITEMS_PER_SCENE[0], ITEMS_PER_SCENE[1] + 1, int(counts[key]))
        stop = start[key] + int(per_scene.sum())
        if stop > len(orders[key]):
            raise UserError(
                f"fmnist_scenes {key}_scenes={counts[key]} needs more Fashion-MNIST items than "
                f"the {len(orders[key])} available: ask for fewer scenes"
            )
        if key == "train":
            start["val"] = stop
        pool = pools[key]
        images, masks, items, instances = _render_split(
            pool.images, pool.labels, orders[key][start[key] : stop], per_scene, photos, size, rng
        )
        arrays |= {f"{key}_images": images, f"{key}_masks": masks, f"{key}_items": items}
        arrays[f"{key}_instances"] = instances
    return arrays


def scene_photos() -> list[np.ndarray]:
    """scikit-image's bundled photographs as uint8 RGB arrays (gray ones repeated to RGB)."""
    try:
        import skimage.data
    except ImportError as exc:
        raise UserError(
            "data=fmnist_scenes needs scikit-image for its photographs: pip install scikit-image"
        ) from exc
    photos = []
    for name in SCENE_PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        photos.append(np.ascontiguousarray(pixels[:, :, :3]))
    return photos


def _render_split(
    item_images: np.ndarray,
    item_labels: np.ndarray,
    picked: np.ndarray,
    per_scene: np.ndarray,
    photos: Sequence[np.ndarray],
    size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The scenes of one split: images (N,S,S,3), masks (N,S,S), item indices (N,5) and
    instance maps (N,S,S: k where the k-th item pasted shows, 0 elsewhere)."""
    n = len(per_scene)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    instances = np.zeros((n, size, size), dtype=np.uint8)
    items = np.full((n, ITEMS_PER_SCENE[1]), -1, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(per_scene)])
    for scene in range(n):
        chosen = picked[offsets[scene] : offsets[scene + 1]]
        items[scene, : len(chosen)] = chosen
        canvas = _background(photos[rng.integers(len(photos))], size, rng)
        for k, index in enumerate(chosen, start=1):
            item, label = item_images[index], int(item_labels[index])
            _paste_item(canvas, masks[scene], item, label, rng, instances[scene], k)
        images[scene] = np.round(canvas).astype(np.uint8)
    return images, masks, items, instances


def _background(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of ``photo``, maybe mirrored, resized to ``size`` (float32 RGB)."""
    height, width = photo.shape[:2]
    side = int(rng.integers(min(size, height, width), min(height, width) + 1))
    top, left = int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    pixels = np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.float32)
    return pixels[:, ::-1].copy() if rng.random() < 0.5 else pixels.copy()


def _paste_item(
    canvas: np.ndarray,
    mask: np.ndarray,
    item: np.ndarray,
    label: int,
    rng: np.random.Generator,
    instances: np.ndarray | None = None,
    instance: int = 0,
) -> None:
    """Paste one item, scaled and tinted, over ``canvas`` and write ``label + 1`` into ``mask``
    (and ``instance`` into ``instances``, when given)."""
    size = canvas.shape[0]
    side = int(rng.integers(round(size * 3 / 16), size // 2 + 1))
    top, left = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
    hue, saturation, value = rng.random(), rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0)
    colour = np.asarray(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32) * 255
    gray = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), np.float32)
    foreground = gray > ITEM_THRESHOLD
    shade = (0.35 + 0.65 * gray / 255)[:, :, None] * colour
    region = canvas[top : top + side, left : left + side]
    region[foreground] = shade[foreground]
    mask[top : top + side, left : left + side][foreground] = label + 1
    if instances is not None:
        instances[top : top + side, left : left + side][foreground] = instance


# ----------------------------------------------------------------------------- user folders

SEG_IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
MASK_LAYOUT = "images in DIR/images/*.jpg and masks in DIR/masks/<same name>.png"


def seg_folder(
    root: str | os.PathLike,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    num_classes: int | None = None,
) -> tuple[MaskedFiles, MaskedFiles, MaskedFiles, tuple[str, ...]]:
    """``root/images`` + ``root/masks`` (PNG class indices, 255 = ignore), or per-split sub-folders.

    With ``root/train`` (and optionally ``val``/``valid``/``validation`` and ``test``), each
    holding ``images/`` and ``masks/``, the splits are used as given and a missing val or test
    split is carved from train with ``split_seed``; otherwise all three are carved from
    ``root``. Class names come from ``root/classes.txt`` (one per line), else ``num_classes``,
    else the largest index found. Mask pixels are read as stored, without the image's EXIF
    rotation.
    """
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"data.root={folder} does not exist: point it at a folder with {MASK_LAYOUT}"
        )
    check_fractions(val_fraction, test_fraction)
    declared = _declared_classes(folder, num_classes)
    if (folder / "train").is_dir():
        val_dir = next((folder / n for n in VAL_DIR_NAMES if (folder / n).is_dir()), None)
        split_dirs = {"train": folder / "train", "val": val_dir, "test": folder / "test"}
    else:
        split_dirs = {"train": folder, "val": None, "test": None}
    split_dirs = {k: d for k, d in split_dirs.items() if d is not None and d.is_dir()}
    pairs = {split: _pair_files(split_dir) for split, split_dir in split_dirs.items()}
    scans = {
        split: [_scan_mask(mask, image) for image, mask in found] for split, found in pairs.items()
    }
    largest = max((top for scan in scans.values() for top, _ in scan), default=-1)
    names = declared or tuple(f"class_{i}" for i in range(max(largest + 1, 1)))
    for split, found in pairs.items():
        _check_class_indices([mask for _, mask in found], scans[split], names, folder)
    sets = {
        split: MaskedFiles(
            tuple(image for image, _ in found),
            tuple(mask for _, mask in found),
            names,
            folder,
            tuple(digest for _, digest in scans[split]),
        )
        for split, found in pairs.items()
    }
    carved = _carve(sets["train"], split_seed, val_fraction, test_fraction, sets.keys(), folder)
    sets |= carved
    return sets["train"], sets["val"], sets["test"], names


def _declared_classes(folder: Path, num_classes: int | None) -> tuple[str, ...] | None:
    """Names from ``classes.txt``, else ``class_i`` for ``num_classes``, else None (infer)."""
    path = folder / "classes.txt"
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(
                f"cannot read {path} ({_one_line(exc)}): write one class name per line"
            ) from exc
        names = tuple(line.strip() for line in lines if line.strip())
        if not names:
            raise UserError(f"{path} is empty: write one class name per line, index 0 first")
        if len(set(names)) != len(names):
            raise UserError(f"{path} names a class twice: make every line unique")
        if num_classes is not None and int(num_classes) != len(names):
            raise UserError(
                f"{path} names {len(names)} classes but num_classes={num_classes}: make them agree"
            )
        return names
    if num_classes is not None:
        if int(num_classes) < 1:
            raise UserError(f"num_classes={num_classes} must be at least 1")
        return tuple(f"class_{i}" for i in range(int(num_classes)))
    return None


def _check_class_indices(
    masks: Sequence[Path], scans: Sequence[tuple[int, bytes]], names: tuple[str, ...], folder: Path
) -> None:
    """Every mask's largest index (255 aside) names a declared class."""
    for mask, (top, _) in zip(masks, scans, strict=True):
        if top >= len(names):
            where = folder / "classes.txt"
            source = str(where) if where.is_file() else "num_classes"
            raise UserError(
                f"mask {mask} has class index {top} but {source} declares {len(names)} classes "
                f"(0-{len(names) - 1}): fix the mask or declare more classes (255 = ignore)"
            )


def _pair_files(split_dir: Path) -> list[tuple[Path, Path]]:
    """Every image of ``split_dir/images`` with its mask ``split_dir/masks/<stem>.png``."""
    image_dir, mask_dir = split_dir / "images", split_dir / "masks"
    for sub in (image_dir, mask_dir):
        if not sub.is_dir():
            raise UserError(f"{sub} is missing: put {MASK_LAYOUT.replace('DIR', str(split_dir))}")
    images = sorted(
        p
        for p in image_dir.iterdir()
        if p.suffix.lower() in SEG_IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if not images:
        raise UserError(
            f"{image_dir} has no images ({', '.join(sorted(SEG_IMAGE_EXTENSIONS))}): add some"
        )
    stems: dict[str, Path] = {}
    pairs = []
    for image in images:
        if image.stem in stems:
            raise UserError(
                f"images {stems[image.stem]} and {image} share a name, so one mask cannot tell "
                "them apart: rename one"
            )
        stems[image.stem] = image
        mask = mask_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise UserError(f"image {image} has no mask {mask}: add the mask or remove the image")
        pairs.append((image, mask))
    return pairs


def read_mask(path: Path) -> np.ndarray:
    """A mask PNG as an (H, W) array of class indices (palette PNGs: the indices, not colours)."""
    try:
        with Image.open(path) as mask:
            mode = mask.mode
            pixels = np.asarray(mask)
    except IMAGE_ERRORS as exc:
        raise UnreadableImageError(
            f"cannot decode mask {path} ({type(exc).__name__}: {_one_line(exc)}): "
            "replace it with a PNG of class indices"
        ) from exc
    if (
        pixels.ndim == 3
        and mode in ("RGB", "RGBA")
        and (pixels[:, :, :3] == pixels[:, :, :1]).all()
    ):
        pixels = pixels[:, :, 0]  # gray saved as RGB
    if pixels.ndim != 2:
        raise UserError(
            f"mask {path} is a colour ({mode}) image: save class indices as a mode L or P PNG"
        )
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8)
    if not np.issubdtype(pixels.dtype, np.integer) or pixels.min(initial=0) < 0:
        raise UserError(f"mask {path} ({mode}) does not hold class indices: save it as mode L or P")
    return pixels


def _scan_mask(mask_path: Path, image_path: Path) -> tuple[int, bytes]:
    """Check a mask against its image's size; its largest class index (255 aside) and digest."""
    pixels = read_mask(mask_path)
    try:
        with Image.open(image_path) as image:
            width, height = image.size
    except IMAGE_ERRORS as exc:
        raise UserError(
            f"unreadable image {image_path} ({type(exc).__name__}): remove or replace the file"
        ) from exc
    if pixels.shape != (height, width):
        raise UserError(
            f"mask {mask_path} is {pixels.shape[1]}x{pixels.shape[0]} but its image {image_path} "
            f"is {width}x{height}: give the mask the image's size"
        )
    labelled = pixels[pixels != IGNORE_INDEX]
    digest = hashlib.blake2b(pixels.astype(np.int64).tobytes(), digest_size=8).digest()
    return (int(labelled.max()) if labelled.size else -1), digest


def _carve(
    train: MaskedFiles,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    present: Sequence[str],
    root: Path,
) -> dict[str, MaskedFiles]:
    """The train set and each missing val/test split, drawn from train with the seed."""
    wanted = {"val": val_fraction, "test": test_fraction}
    missing = [split for split in ("val", "test") if split not in present]
    if not missing:
        return {}
    order = np.random.default_rng(seed).permutation(len(train))
    counts = {split: max(1, round(float(wanted[split]) * len(train))) for split in missing}
    if sum(counts.values()) >= len(train):
        raise UserError(
            f"{root} has only {len(train)} training images: too few to carve "
            f"{' and '.join(missing)} from; add images or give {'/ and '.join(missing)}/ folders"
        )
    carved, start = {}, 0
    for split in missing:
        carved[split] = train.subset(np.sort(order[start : start + counts[split]]))
        start += counts[split]
    carved["train"] = train.subset(np.sort(order[start:]))
    return carved
