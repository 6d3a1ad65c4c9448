"""Detection data: images with boxes, generated Fashion-MNIST scenes, and COCO-format files.

A detection source returns ``(train, val, test, class_names)``: three ``BoxedImages`` and the
class names, ``"background"`` first (index 0, as torchvision's detectors expect). Boxes are
float32 ``[N, 4]`` in pixels, ``x1, y1, x2, y2`` with ``x2, y2`` the far pixel edges (a box
around pixel columns 3-5 is ``x1=3, x2=6``); labels are int64 ``1..C``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from transferlab.data.datasets import decode_rgb
from transferlab.data.segmentation import SCENE_CLASSES, fmnist_scenes
from transferlab.data.sources import IMAGE_ERRORS, UnreadableImageError, _one_line
from transferlab.data.splits import check_fractions
from transferlab.errors import UserError

log = logging.getLogger(__name__)

BACKGROUND = "background"
# COCO boxes may overshoot the image by rounding; beyond this many pixels a box is an error.
OUTSIDE_TOLERANCE = 1.0
# A carved test set does not move with the run seed (as classification's): runs with
# different seeds are evaluated on the same images.
TEST_SPLIT_SEED = 0


class BoxedImages(Protocol):
    """Images with boxes and labels each, in memory or on disk."""

    class_names: tuple[str, ...]
    labels: Sequence[np.ndarray]  # per image, the labels ``load`` returns (few-shot selection)
    image_ids: np.ndarray  # per image, the ``image_id`` of its target

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        """The RGB image at ``index``, its float32 [N, 4] xyxy boxes and int64 [N] labels."""
        ...

    def crowd(self, index: int) -> np.ndarray:
        """Per box of ``load(index)``: whether it marks a crowd region (bool [N])."""
        ...

    def update_hash(self, digest: hashlib._Hash, indices: np.ndarray) -> None:
        """Feed the identity of the images and boxes at ``indices`` into ``digest``."""
        ...


def _box_arrays(boxes: Sequence[Any], labels: Sequence[Any]) -> tuple[tuple, tuple]:
    """Per image float32 [N, 4] boxes and int64 [N] labels, checked against each other."""
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} box arrays but {len(labels)} label arrays")
    out_boxes = tuple(np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in boxes)
    out_labels = tuple(np.asarray(lab, dtype=np.int64).reshape(-1) for lab in labels)
    for index, (b, lab) in enumerate(zip(out_boxes, out_labels, strict=True)):
        if len(b) != len(lab):
            raise ValueError(f"image {index}: {len(b)} boxes but {len(lab)} labels")
    return out_boxes, out_labels


def _hash_targets(digest: hashlib._Hash, *arrays: np.ndarray) -> None:
    for array in arrays:
        digest.update(len(array).to_bytes(8, "little"))
        digest.update(np.ascontiguousarray(array).data)


@dataclass(frozen=True, eq=False)
class BoxedArrays:
    """Images in memory (uint8 (N, H, W, 3)) with per-image boxes and labels; no crowds.

    ``items`` optionally records where each image's content came from (scenes: the
    Fashion-MNIST indices pasted into it). Image ids are the positions in the set.
    """

    images: np.ndarray
    boxes: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    class_names: tuple[str, ...]
    items: np.ndarray | None = None
    image_ids: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[3] != 3:
            raise ValueError(
                f"expected uint8 (N,H,W,3) images, got {self.images.dtype} {self.images.shape}"
            )
        boxes, labels = _box_arrays(self.boxes, self.labels)
        if len(boxes) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(boxes)} box arrays")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "image_ids", np.arange(len(self.images), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        return Image.fromarray(self.images[index]), self.boxes[index], self.labels[index]

    def crowd(self, index: int) -> np.ndarray:
        return np.zeros(len(self.boxes[index]), dtype=bool)

    def update_hash(self, digest: hashlib._Hash, indices: np.ndarray) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        digest.update(indices.tobytes())
        for start in range(0, len(indices), 4096):
            digest.update(np.ascontiguousarray(self.images[indices[start : start + 4096]]).data)
        for index in indices:
            _hash_targets(digest, self.boxes[index], self.labels[index])


@dataclass(frozen=True, eq=False)
class BoxedFiles:
    """Image files with boxes, labels and crowd flags; ``sizes`` the (width, height) the boxes
    refer to, checked when an image is decoded; ``root`` keeps the fingerprint portable."""

    image_paths: tuple[Path, ...]
    sizes: tuple[tuple[int, int], ...]
    boxes: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    crowds: tuple[np.ndarray, ...]
    image_ids: np.ndarray
    class_names: tuple[str, ...]
    root: Path

    def __post_init__(self) -> None:
        boxes, labels = _box_arrays(self.boxes, self.labels)
        crowds = tuple(np.asarray(c, dtype=bool).reshape(-1) for c in self.crowds)
        counts = {len(self.image_paths), len(self.sizes), len(boxes), len(crowds)}
        if counts != {len(self.image_ids)}:
            raise ValueError(f"paths, sizes, boxes, crowds and ids differ in length: {counts}")
        if any(len(c) != len(b) for c, b in zip(crowds, boxes, strict=True)):
            raise ValueError("crowd flags do not match the boxes")
        object.__setattr__(self, "boxes", boxes)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "crowds", crowds)
        object.__setattr__(self, "image_ids", np.asarray(self.image_ids, dtype=np.int64))
        object.__setattr__(self, "class_names", tuple(self.class_names))

    def __len__(self) -> int:
        return len(self.image_paths)

    def load(self, index: int) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        path = self.image_paths[index]
        rgb = decode_rgb(path)
        width, height = self.sizes[index]
        if rgb.size != (width, height):
            raise UnreadableImageError(
                f"image {path} is {rgb.size[0]}x{rgb.size[1]} but its annotations say "
                f"{width}x{height}: fix the width and height in the annotation file"
            )
        return rgb, self.boxes[index], self.labels[index]

    def crowd(self, index: int) -> np.ndarray:
        return self.crowds[index]

    def update_hash(self, digest: hashlib._Hash, indices: np.ndarray) -> None:
        for index in np.asarray(indices, dtype=np.int64):
            path = self.image_paths[index]
            name = path.relative_to(self.root) if path.is_relative_to(self.root) else path
            digest.update(f"{name.as_posix()}\0{self.image_ids[index]}\0".encode())
            _hash_targets(digest, self.boxes[index], self.labels[index], self.crowds[index])

    def subset(self, indices: np.ndarray) -> BoxedFiles:
        """The images at ``indices``, in that order."""
        pick = [int(i) for i in np.asarray(indices, dtype=np.int64)]
        return replace(
            self,
            image_paths=tuple(self.image_paths[i] for i in pick),
            sizes=tuple(self.sizes[i] for i in pick),
            boxes=tuple(self.boxes[i] for i in pick),
            labels=tuple(self.labels[i] for i in pick),
            crowds=tuple(self.crowds[i] for i in pick),
            image_ids=self.image_ids[pick],
        )

    def without_crowds(self) -> BoxedFiles:
        """The same images with their crowd boxes left out (training targets)."""
        keep = [~c for c in self.crowds]
        return replace(
            self,
            boxes=tuple(b[k] for b, k in zip(self.boxes, keep, strict=True)),
            labels=tuple(lab[k] for lab, k in zip(self.labels, keep, strict=True)),
            crowds=tuple(c[k] for c, k in zip(self.crowds, keep, strict=True)),
        )


DetSplits = tuple[BoxedImages, BoxedImages, BoxedImages, tuple[str, ...]]


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DetSourceOptions:
    """The ``data`` keys a detection source may read (paths as the user gave them)."""

    root: str | None = None
    annotations: str | None = None
    images: str | None = None
    val_annotations: str | None = None
    val_images: str | None = None
    test_annotations: str | None = None
    test_images: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    strict: bool = True
    image_size: int = 128
    seed: int = 0
    download: bool = True

    def reject(self, source: str, *keys: str) -> None:
        """A one-line error for any of ``keys`` set although ``source`` does not read it."""
        given = [key for key in keys if getattr(self, key) not in (None, "")]
        if given:
            raise UserError(
                f"data.{given[0]} is for data.source=coco, not {source}: remove it or "
                "choose data=coco"
            )


DetSourceFn = Callable[[DetSourceOptions], DetSplits]
DET_SOURCES: dict[str, DetSourceFn] = {}
COCO_KEYS = (
    "annotations",
    "images",
    "val_annotations",
    "val_images",
    "test_annotations",
    "test_images",
)


def register_det_source(name: str) -> Callable[[DetSourceFn], DetSourceFn]:
    """Register a detection source under ``name`` (its ``data.source`` value)."""

    def add(fn: DetSourceFn) -> DetSourceFn:
        DET_SOURCES[name] = fn
        return fn

    return add


def load_det_source(name: str, options: DetSourceOptions) -> DetSplits:
    """Run the detection source registered as ``name``."""
    if name not in DET_SOURCES:
        raise UserError(
            f"data.source={name} is not a detection source: choose data= from "
            f"{', '.join(sorted(DET_SOURCES))} with task=detection"
        )
    return DET_SOURCES[name](options)


# ----------------------------------------------------------------------------- Fashion-MNIST scenes


def instance_boxes(instances: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tight box and class of every item visible in an (H, W) instance map, in paste order.

    ``instances`` holds k where the k-th item shows (0: none), ``mask`` the class indices;
    an item covered entirely by later ones has no pixels and no box.
    """
    boxes, labels = [], []
    for k in range(1, int(instances.max(initial=0)) + 1):
        pixels = instances == k
        rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
        if not len(rows):
            continue
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
        labels.append(int(mask[pixels][0]))
    return (
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
    )


def fmnist_scene_boxes(
    seed: int = 0,
    train_scenes: int = 400,
    val_scenes: int = 100,
    test_scenes: int = 200,
    size: int = 128,
    cache_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    download: bool = True,
) -> tuple[BoxedArrays, BoxedArrays, BoxedArrays, tuple[str, ...]]:
    """The segmentation source's ``fmnist_scenes`` (same scenes, seeds and cache), boxed.

    Each pasted item's box is the extent of its pixels that stay visible (above the mask's
    threshold, not covered by later items); fully covered items have none. Labels are the
    mask's class indices, so ``class_names`` are the same (``background`` first).
    """
    splits = fmnist_scenes(
        seed=seed,
        train_scenes=train_scenes,
        val_scenes=val_scenes,
        test_scenes=test_scenes,
        size=size,
        cache_dir=cache_dir,
        root=root,
        download=download,
        with_instances=True,
    )
    boxed = []
    for split in splits[:3]:
        pairs = [instance_boxes(i, m) for i, m in zip(split.instances, split.masks, strict=True)]
        boxed.append(
            BoxedArrays(
                split.images,
                tuple(b for b, _ in pairs),
                tuple(lab for _, lab in pairs),
                SCENE_CLASSES,
                split.items,
            )
        )
    return boxed[0], boxed[1], boxed[2], SCENE_CLASSES


@register_det_source("fmnist_scenes")
def _scenes_source(options: DetSourceOptions) -> DetSplits:
    options.reject("fmnist_scenes", *COCO_KEYS)
    # Seed 0 whatever the run's seed, as segmentation: every run sees the same scenes.
    return fmnist_scene_boxes(
        seed=0, size=int(options.image_size), root=options.root, download=options.download
    )


# ----------------------------------------------------------------------------- COCO

REASONS = {
    "unknown_image": "refer to no image of the file",
    "bad_bbox": "have no [x, y, width, height] bbox",
    "unknown_category": "have an unknown category_id",
    "empty": "have a zero or negative width or height",
    "outside": "reach outside their image",
    "missing_file": "belong to a missing image file",
}


@dataclass
class _CocoFile:
    """One parsed annotation file: its categories and its images' records."""

    path: Path
    categories: dict[int, str]
    images: list[dict[str, Any]]
    annotations: list[dict[str, Any]]


def _resolve(path: str | os.PathLike, root: str | os.PathLike | None) -> Path:
    """``path`` with ``~`` expanded, relative to ``root`` when that is given."""
    resolved = Path(path).expanduser()
    return Path(root).expanduser() / resolved if root and not resolved.is_absolute() else resolved


def _read_coco(path: Path, key: str) -> _CocoFile:
    """Parse the file; a file that is not COCO detection JSON is a one-line error."""
    if not path.is_file():
        raise UserError(f"data.{key}={path} does not exist: point it at a COCO-format JSON file")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path} as JSON ({_one_line(exc)}): fix the file") from exc
    if not isinstance(content, dict) or any(
        not isinstance(content.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise UserError(
            f"{path} is not a COCO detection file: it needs lists 'images', 'annotations' "
            "and 'categories'"
        )
    categories: dict[int, str] = {}
    for category in content["categories"]:
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise UserError(f"{path}: category {category!r} needs an 'id' and a 'name'")
        cid = _as_int(category["id"], f"{path}: category id {category['id']!r}")
        if cid in categories:
            raise UserError(f"{path}: category id {cid} appears twice: make the ids unique")
        categories[cid] = str(category["name"])
    if not categories:
        raise UserError(f"{path} declares no categories: add its object classes to 'categories'")
    names = [BACKGROUND, *categories.values()]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise UserError(
            f"{path}: category name {repeated[0]!r} is used twice (or is the reserved "
            f"{BACKGROUND!r}): make the names unique"
        )
    for record in (*content["images"], *content["annotations"]):
        if not isinstance(record, dict) or "id" not in record:
            raise UserError(f"{path}: every image and annotation needs an 'id', not {record!r}")
    return _CocoFile(path, categories, content["images"], content["annotations"])


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise UserError(f"{what} is not an integer: fix the annotation file")
    return int(value)


def _image_size(record: dict[str, Any], path: Path) -> tuple[int, int]:
    """(width, height) from the record, else from the file's header."""
    width, height = record.get("width"), record.get("height")
    if isinstance(width, (int, float)) and isinstance(height, (int, float)):
        return int(width), int(height)
    try:
        with Image.open(path) as image:
            return image.size
    except IMAGE_ERRORS as exc:
        raise UserError(
            f"unreadable image {path} ({type(exc).__name__}): remove or replace the file"
        ) from exc


def _check_bbox(bbox: Any, width: int, height: int) -> tuple[str | None, np.ndarray | None]:
    """(reason it is rejected, None) or (None, the xyxy box clipped to the image)."""
    if (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
        or not all(np.isfinite(bbox))
    ):
        return "bad_bbox", None
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return "empty", None
    tol = OUTSIDE_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        return "outside", None
    box = np.array([max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)])
    if box[2] <= box[0] or box[3] <= box[1]:
        return "outside", None
    return None, box.astype(np.float32)


def _rejection(
    reason: str, file: _CocoFile, ann: Mapping[str, Any] | None, image: str, fix: str
) -> str:
    """The one-line message for a rejected annotation (or image, for a missing file)."""
    if ann is None:
        return f"{file.path}: image file {image} does not exist (it has no annotations): {fix}"
    what = f"{file.path}: annotation {ann['id']} (image {image})"
    bbox = ann.get("bbox")
    details = {
        "unknown_image": f"refers to image_id {ann.get('image_id')!r}, which is not among the "
        "file's images",
        "bad_bbox": f"has bbox {bbox!r}, not [x, y, width, height]",
        "unknown_category": f"has category_id {ann.get('category_id')!r}, which is not among "
        f"the categories ({', '.join(str(c) for c in sorted(file.categories))})",
        "empty": f"has bbox {bbox!r} with a zero or negative width or height",
        "outside": f"has bbox {bbox!r} reaching outside the image by more than "
        f"{OUTSIDE_TOLERANCE:g} px",
        "missing_file": "is on an image file that does not exist",
    }
    return f"{what} {details[reason]}: {fix}"


def _coco_split(
    file: _CocoFile, folder: Path, labels: Mapping[int, int], strict: bool, images_key: str
) -> BoxedFiles:
    """The file's images (all of them, annotated or not) with their validated boxes."""
    skip_fix = "fix it, or set data.strict=false to skip such annotations"
    records: dict[int, dict[str, Any]] = {}
    for record in file.images:
        iid = _as_int(record["id"], f"{file.path}: image id {record['id']!r}")
        if iid in records:
            raise UserError(f"{file.path}: image id {iid} appears twice: make the ids unique")
        if not isinstance(record.get("file_name"), str):
            raise UserError(f"{file.path}: image {iid} has no 'file_name': add it")
        records[iid] = record
    per_image: dict[int, list[dict[str, Any]]] = {iid: [] for iid in records}
    skipped: Counter[str] = Counter()
    for ann in file.annotations:
        image_id = ann.get("image_id")
        if not isinstance(image_id, (int, float)) or image_id not in per_image:
            if strict:
                raise UserError(_rejection("unknown_image", file, ann, "unknown", skip_fix))
            skipped["unknown_image"] += 1
            continue
        per_image[image_id].append(ann)

    paths, sizes, boxes, classes, crowds, ids = [], [], [], [], [], []
    missing_images = 0
    for iid, record in records.items():
        path = folder / record["file_name"]
        anns = per_image[iid]
        if not path.is_file():
            if strict:
                fix = (
                    f"set data.{images_key} to the folder holding it, or set data.strict=false "
                    "to skip images without a file"
                )
                raise UserError(
                    _rejection("missing_file", file, anns[0] if anns else None, str(path), fix)
                )
            missing_images += 1
            skipped["missing_file"] += len(anns)
            continue
        width, height = _image_size(record, path)
        kept_boxes, kept_labels, kept_crowd = [], [], []
        for ann in anns:
            reason, box = None, None
            category = ann.get("category_id")
            if not isinstance(category, (int, float)) or category not in labels:
                reason = "unknown_category"
            else:
                reason, box = _check_bbox(ann.get("bbox"), width, height)
            if reason is not None:
                if strict:
                    raise UserError(_rejection(reason, file, ann, str(path), skip_fix))
                skipped[reason] += 1
                continue
            kept_boxes.append(box)
            kept_labels.append(labels[category])
            kept_crowd.append(bool(ann.get("iscrowd", 0)))
        paths.append(path)
        sizes.append((int(width), int(height)))
        boxes.append(np.asarray(kept_boxes, dtype=np.float32).reshape(-1, 4))
        classes.append(np.asarray(kept_labels, dtype=np.int64))
        crowds.append(np.asarray(kept_crowd, dtype=bool))
        ids.append(iid)
    if skipped or missing_images:
        counts = ", ".join(f"{n} {REASONS[r]}" for r, n in sorted(skipped.items()) if n)
        images = f"; {missing_images} image(s) without a file left out" if missing_images else ""
        log.warning(
            "%s: skipped %d annotation(s) (data.strict=false): %s%s",
            file.path,
            sum(skipped.values()),
            counts or "none",
            images,
        )
    names = (BACKGROUND, *(file.categories[c] for c in sorted(file.categories)))
    return BoxedFiles(
        tuple(paths),
        tuple(sizes),
        tuple(boxes),
        tuple(classes),
        tuple(crowds),
        np.asarray(ids, dtype=np.int64),
        names,
        folder,
    )


def _carve(
    train: BoxedFiles,
    missing: Sequence[str],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    where: Path,
) -> dict[str, BoxedFiles]:
    """Each missing val/test split drawn from ``train`` (test with a fixed seed), and the rest."""
    fractions = dict(
        zip(("val", "test"), check_fractions(val_fraction, test_fraction), strict=True)
    )
    pool = np.arange(len(train), dtype=np.int64)
    carved: dict[str, BoxedFiles] = {}
    for split in ("test", "val"):
        if split not in missing:
            continue
        count = max(1, round(fractions[split] * len(train)))
        if count >= len(pool):
            raise UserError(
                f"{where} has only {len(train)} images: too few to carve "
                f"{' and '.join(missing)} from; add images or give data.{split}_annotations"
            )
        rng = np.random.default_rng(TEST_SPLIT_SEED if split == "test" else seed)
        order = rng.permutation(pool)
        carved[split] = train.subset(np.sort(order[:count]))
        pool = np.sort(order[count:])
    carved["train"] = train.subset(pool)
    return carved


def coco_detection(
    annotations: str | os.PathLike,
    images: str | os.PathLike | None = None,
    val_annotations: str | os.PathLike | None = None,
    val_images: str | os.PathLike | None = None,
    test_annotations: str | os.PathLike | None = None,
    test_images: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    strict: bool = True,
) -> tuple[BoxedFiles, BoxedFiles, BoxedFiles, tuple[str, ...]]:
    """COCO-format detection files: ``annotations`` for training, optional val and test files.

    A split without its own file is carved from ``annotations``'s images: test with a fixed
    seed (the same test images for every run seed), val with ``split_seed``. Each split's
    images folder is its ``*images`` key, else ``images``, else the folder of its JSON file;
    relative paths are taken from ``root`` when that is given. Categories (those of
    ``annotations``; the other files must declare the same) become labels 1..C in id order,
    named as in the file. Boxes ``[x, y, w, h]`` become xyxy, clipped to the image. Crowd
    annotations (``iscrowd: 1``) are left out of the training split; val and test keep them,
    flagged by ``crowd()``, so that a COCO-style metric can ignore detections on them.
    Images without annotations are kept, with no boxes. An annotation with no bbox, a zero
    or negative size, a box more than 1 px outside its image, an unknown category or image,
    or an image file that does not exist, is a one-line ``UserError``; with ``strict=False``
    they are skipped (missing files: the image with its annotations) and counted in a warning.
    Images are read as stored, without EXIF rotation (as COCO's own tools do).
    """
    if not annotations:
        raise UserError("data=coco needs data.annotations=FILE (a COCO-format JSON)")
    train_file = _read_coco(_resolve(annotations, root), "annotations")
    labels = {cid: i + 1 for i, cid in enumerate(sorted(train_file.categories))}

    def folder(key: str, own: Any, file: _CocoFile) -> tuple[Path, str]:
        if own:
            return _resolve(own, root), key
        if images:
            return _resolve(images, root), "images"
        return file.path.parent, key

    sets: dict[str, BoxedFiles] = {}
    given = {"val": (val_annotations, val_images), "test": (test_annotations, test_images)}
    for split, (ann_path, image_dir) in (("train", (annotations, images)), *given.items()):
        if not ann_path:
            continue
        if split == "train":
            file = train_file
        else:
            file = _read_coco(_resolve(ann_path, root), f"{split}_annotations")
            if file.categories != train_file.categories:
                raise UserError(
                    f"{file.path} declares other categories than {train_file.path}: give every "
                    "file the same categories (ids and names)"
                )
        key = "images" if split == "train" else f"{split}_images"
        image_folder, images_key = folder(key, image_dir, file)
        sets[split] = _coco_split(file, image_folder, labels, bool(strict), images_key)
    missing = [split for split in ("val", "test") if split not in sets]
    if missing:
        sets |= _carve(
            sets["train"],
            missing,
            int(split_seed),
            val_fraction,
            test_fraction,
            train_file.path,
        )
    names = sets["train"].class_names
    return sets["train"].without_crowds(), sets["val"], sets["test"], names


@register_det_source("coco")
def _coco_source(options: DetSourceOptions) -> DetSplits:
    return coco_detection(
        options.annotations,
        images=options.images,
        val_annotations=options.val_annotations,
        val_images=options.val_images,
        test_annotations=options.test_annotations,
        test_images=options.test_images,
        root=options.root,
        split_seed=options.seed,
        val_fraction=options.val_fraction,
        test_fraction=options.test_fraction,
        strict=options.strict,
    )
