"""Detection data: boxed scenes, COCO files, box-aware transforms, few-shot selection, batches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.data.det_datamodule import DetectionDataModule, sample_images_per_class
from transferlab.data.det_dataset import DetectionDataset, detection_collate
from transferlab.data.det_transforms import create_det_eval_transform, create_det_train_transform
from transferlab.data.detection import (
    BoxedArrays,
    coco_detection,
    fmnist_scene_boxes,
    instance_boxes,
)
from transferlab.data.segmentation import SCENE_CLASSES, fmnist_scenes, scenes_cache_path
from transferlab.data.sources import UnreadableImageError
from transferlab.errors import UserError

SMALL = {"train_scenes": 12, "val_scenes": 6, "test_scenes": 8, "size": 48}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def scene_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scenes")


@pytest.fixture(scope="module")
def boxed(scene_cache: Path):
    return fmnist_scene_boxes(seed=3, cache_dir=scene_cache, **SMALL)


@pytest.fixture(scope="module")
def masked(boxed, scene_cache: Path):
    return fmnist_scenes(seed=3, cache_dir=scene_cache, with_instances=True, **SMALL)


# ----------------------------------------------------------------------------- fmnist_scenes


def test_scene_boxes_are_the_extents_of_the_mask(boxed, masked) -> None:
    assert boxed[3] == SCENE_CLASSES and boxed[3][0] == "background"
    total = 0
    for split, seg in zip(boxed[:3], masked[:3], strict=True):
        assert len(split) == len(seg) and split.class_names == SCENE_CLASSES
        np.testing.assert_array_equal(split.images, seg.images)  # the same scenes
        np.testing.assert_array_equal(split.items, seg.items)
        for index in range(len(split)):
            image, boxes, labels = split.load(index)
            mask = seg.masks[index]
            assert image.size == (48, 48) and boxes.dtype == np.float32 and labels.dtype == np.int64
            assert 1 <= len(boxes) <= (split.items[index] >= 0).sum()
            assert ((labels >= 1) & (labels <= 10)).all()
            covered = np.zeros(mask.shape, dtype=bool)
            for box, label in zip(boxes.astype(int), labels, strict=True):
                x1, y1, x2, y2 = box
                assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 48
                inside = mask[y1:y2, x1:x2]
                # Tight: every edge row and column of the box holds a pixel of its class.
                for edge in (inside[0], inside[-1], inside[:, 0], inside[:, -1]):
                    assert (edge == label).any()
                others = [b for b in boxes.astype(int) if not np.array_equal(b, box)]
                if not any(_overlap(box, other) for other in others):
                    assert set(np.unique(inside)) <= {0, int(label)}  # only its own class
                covered[y1:y2, x1:x2] |= mask[y1:y2, x1:x2] == label
            # Every labelled pixel is inside a box of its own class.
            assert covered[mask > 0].all() and not covered[mask == 0].any()
            total += len(boxes)
    assert total > 2 * sum(len(s) for s in boxed[:3])


def _overlap(a: np.ndarray, b: np.ndarray) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_instance_boxes_skip_hidden_items_and_clip_to_visible_pixels() -> None:
    instances = np.zeros((10, 12), dtype=np.uint8)
    mask = np.zeros((10, 12), dtype=np.uint8)
    instances[1:6, 2:8], mask[1:6, 2:8] = 1, 4  # item 1, then partly covered by item 3
    instances[3:9, 5:11], mask[3:9, 5:11] = 3, 7  # item 2 was covered entirely by item 3
    instances[7, 0], mask[7, 0] = 4, 2  # a single visible pixel
    boxes, labels = instance_boxes(instances, mask)
    np.testing.assert_array_equal(boxes, [[2, 1, 8, 6], [5, 3, 11, 9], [0, 7, 1, 8]])
    np.testing.assert_array_equal(labels, [4, 7, 2])
    empty = instance_boxes(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
    assert empty[0].shape == (0, 4) and empty[1].shape == (0,)


def test_scene_cache_without_instances_is_regenerated(boxed, scene_cache: Path) -> None:
    path = scenes_cache_path(3, {"train": 12, "val": 6, "test": 8}, 48, scene_cache)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    assert {"train_instances", "val_instances", "test_instances"} <= set(arrays)
    old = {k: v for k, v in arrays.items() if not k.endswith("_instances")}
    with open(path, "wb") as file:
        np.savez_compressed(file, **old)
    segmentation = fmnist_scenes(seed=3, cache_dir=scene_cache, **SMALL)  # reads the old file
    assert segmentation[0].instances is None
    again = fmnist_scene_boxes(seed=3, cache_dir=scene_cache, **SMALL)  # regenerates it
    with np.load(path) as data:
        assert "train_instances" in data.files
    for first, second in zip(boxed[:3], again[:3], strict=True):
        np.testing.assert_array_equal(first.images, second.images)
        for a, b in zip(first.boxes, second.boxes, strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        segmentation[0].masks, fmnist_scenes(seed=3, cache_dir=scene_cache, **SMALL)[0].masks
    )


# ----------------------------------------------------------------------------- COCO

CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 10, "name": "bird"}]


def write_coco(
    folder: Path,
    images: list[tuple[int, str, int, int]],
    annotations: list[dict],
    name: str = "train.json",
    categories: list[dict] = CATEGORIES,
    write_images: bool = True,
) -> Path:
    """A COCO JSON at ``folder/name`` and a PNG (width x height) for each image."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for image_id, file_name, width, height in images:
        records.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        if write_images:
            pixels = np.full((height, width, 3), image_id * 20 % 256, dtype=np.uint8)
            Image.fromarray(pixels).save(folder / file_name)
    for i, ann in enumerate(annotations):
        ann.setdefault("id", 100 + i)
        ann.setdefault("iscrowd", 0)
    content = {"images": records, "annotations": annotations, "categories": categories}
    path = folder / name
    path.write_text(json.dumps(content))
    return path


def tiny_coco(folder: Path) -> Path:
    images = [
        (1, "a.png", 40, 30),
        (2, "b.png", 32, 32),
        (3, "c.png", 24, 20),
        (4, "d.png", 16, 16),
    ]
    annotations = [
        {"image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5]},
        {"image_id": 1, "category_id": 10, "bbox": [20.5, 0, 19.5, 30]},
        {"image_id": 2, "category_id": 3, "bbox": [0, 0, 32, 32]},
        {"image_id": 3, "category_id": 7, "bbox": [4, 4, 8, 8], "iscrowd": 1},
        {"image_id": 3, "category_id": 3, "bbox": [-0.5, 1, 5, 19.5]},  # within 1 px: clipped
    ]  # d.png: no annotations
    return write_coco(folder, images, annotations)


def test_coco_boxes_xyxy_contiguous_labels_and_files(tmp_path: Path) -> None:
    train_file = tiny_coco(tmp_path / "train")
    val_file = write_coco(
        tmp_path / "val",
        [(11, "v.png", 20, 20), (12, "w.png", 20, 20)],
        [
            {"image_id": 11, "category_id": 10, "bbox": [1, 2, 3, 4], "id": 900},
            {"image_id": 11, "category_id": 3, "bbox": [0, 0, 20, 20], "iscrowd": 1, "id": 901},
        ],
        name="val.json",
    )
    test_file = write_coco(tmp_path / "test", [(21, "t.png", 8, 8)], [], name="test.json")
    train, val, test, names = coco_detection(
        train_file, val_annotations=val_file, test_annotations=test_file
    )
    assert names == ("background", "dog", "cat", "bird")  # ids 3, 7, 10 in id order
    assert (len(train), len(val), len(test)) == (4, 2, 1)
    assert list(train.image_ids) == [1, 2, 3, 4]
    by_id = {int(i): k for k, i in enumerate(train.image_ids)}
    image, boxes, labels = train.load(by_id[1])
    assert image.mode == "RGB" and image.size == (40, 30)
    np.testing.assert_allclose(boxes, [[2, 3, 12, 8], [20.5, 0, 40, 30]])
    np.testing.assert_array_equal(labels, [2, 3])
    assert boxes.dtype == np.float32 and labels.dtype == np.int64
    _, boxes, labels = train.load(by_id[3])  # the crowd left out of training targets
    np.testing.assert_allclose(boxes, [[0, 1, 4.5, 20]])  # clipped to the image
    np.testing.assert_array_equal(labels, [1])
    _, boxes, labels = train.load(by_id[4])  # an image without annotations is kept
    assert boxes.shape == (0, 4) and labels.shape == (0,)
    # Validation keeps the crowd region, flagged, for a COCO-style metric to ignore.
    _, boxes, labels = val.load(0)
    np.testing.assert_allclose(boxes, [[1, 2, 4, 6], [0, 0, 20, 20]])
    np.testing.assert_array_equal(labels, [3, 1])
    np.testing.assert_array_equal(val.crowd(0), [False, True])
    assert val.image_paths[0] == tmp_path / "val" / "v.png"  # its JSON's folder
    sample = DetectionDataset(val, np.arange(2), create_det_eval_transform(10, MEAN, STD))[0]
    np.testing.assert_array_equal(sample["target"]["iscrowd"].numpy(), [0, 1])
    np.testing.assert_allclose(sample["target"]["boxes"].numpy(), [[0.5, 1, 2, 3], [0, 0, 10, 10]])
    assert sample["target"]["image_id"] == 11


def test_coco_images_folder_and_root(tmp_path: Path) -> None:
    tiny_coco(tmp_path / "data" / "pictures")
    (tmp_path / "data" / "ann").mkdir()
    (tmp_path / "data" / "pictures" / "train.json").rename(tmp_path / "data" / "ann" / "x.json")
    train, val, test, _ = coco_detection(
        "ann/x.json", images="pictures", root=tmp_path / "data", val_fraction=0.25
    )
    assert len(train) + len(val) + len(test) == 4
    assert all(p.parent == tmp_path / "data" / "pictures" for p in train.image_paths)
    message = one_line(coco_detection, tmp_path / "data" / "ann" / "x.json")
    assert "a.png" in message and "annotation 100" in message and "data.images" in message


def test_coco_carved_splits_are_seeded(tmp_path: Path) -> None:
    images = [(i, f"i{i}.png", 8, 8) for i in range(1, 21)]
    annotations = [{"image_id": i, "category_id": 3, "bbox": [1, 1, 4, 4]} for i in range(1, 21)]
    path = write_coco(tmp_path, images, annotations)
    train, val, test, _ = coco_detection(path, split_seed=1, val_fraction=0.1, test_fraction=0.2)
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    ids = [set(s.image_ids.tolist()) for s in (train, val, test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    again = coco_detection(path, split_seed=1)
    assert set(again[1].image_ids.tolist()) == ids[1]
    other = coco_detection(path, split_seed=2)
    assert set(other[2].image_ids.tolist()) == ids[2]  # test does not move with the seed
    assert any(
        set(coco_detection(path, split_seed=s)[1].image_ids.tolist()) != ids[1] for s in range(2, 6)
    )


def one_line(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


BAD = {
    "negative size": ({"bbox": [2, 2, -3, 4]}, "zero or negative", "have a zero or negative"),
    "zero size": ({"bbox": [2, 2, 5, 0]}, "zero or negative", "have a zero or negative"),
    "outside": ({"bbox": [10, 10, 25, 5]}, "outside the image", "reach outside their image"),
    "unknown category": ({"category_id": 99}, "category_id 99", "have an unknown category_id"),
    "no bbox": ({"bbox": [1, 2, 3]}, "not [x, y, width, height]", "have no [x, y, width"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_coco_bad_annotation_names_id_and_image(
    case: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    change, error, warning = BAD[case]
    path = tiny_coco(tmp_path)
    content = json.loads(path.read_text())
    bad = {"id": 555, "image_id": 2, "category_id": 3, "bbox": [1, 1, 4, 4]} | change
    content["annotations"].append(bad)
    path.write_text(json.dumps(content))
    message = one_line(coco_detection, path)
    assert "annotation 555" in message and "b.png" in message and error in message, message
    assert "data.strict=false" in message
    with caplog.at_level(logging.WARNING, logger="transferlab.data.detection"):
        train, val, test, _ = coco_detection(path, strict=False, val_fraction=0.25)
    assert f"skipped 1 annotation(s) (data.strict=false): 1 {warning}" in caplog.text
    kept = sum(int((~c).sum()) for s in (train, val, test) for c in s.crowds)
    assert kept == 4  # the 4 valid non-crowd annotations, the bad one skipped
    assert len(train) + len(val) + len(test) == 4


def test_coco_missing_file_names_annotation_and_image(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tiny_coco(tmp_path)
    (tmp_path / "c.png").unlink()
    message = one_line(coco_detection, path)
    assert "c.png" in message and "annotation 103" in message and "does not exist" in message
    with caplog.at_level(logging.WARNING, logger="transferlab.data.detection"):
        train, val, test, _ = coco_detection(
            path, strict=False, val_fraction=0.3, test_fraction=0.3
        )
    assert "skipped 2 annotation(s)" in caplog.text
    assert "2 belong to a missing image file; 1 image(s) without a file left out" in caplog.text
    names = {p.name for s in (train, val, test) for p in s.image_paths}
    assert names == {"a.png", "b.png", "d.png"}


def test_coco_file_problems_are_one_line(tmp_path: Path) -> None:
    path = tiny_coco(tmp_path)
    one_line(coco_detection, tmp_path / "nope.json")
    other = write_coco(tmp_path / "v", [(9, "z.png", 8, 8)], [], "v.json", CATEGORIES[:2])
    assert "other categories" in one_line(coco_detection, path, val_annotations=other)
    (tmp_path / "broken.json").write_text("{not json")
    assert "cannot read" in one_line(coco_detection, tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[]")
    assert "not a COCO detection file" in one_line(coco_detection, tmp_path / "list.json")
    content = json.loads(path.read_text())
    content["annotations"][0]["image_id"] = 77
    path.write_text(json.dumps(content))
    assert "image_id 77" in one_line(coco_detection, path)
    Image.new("RGB", (5, 5)).save(tmp_path / "b.png")  # not the size the file declares
    splits = coco_detection(path, strict=False, val_fraction=0.25, test_fraction=0.25)[:3]
    (split,) = [s for s in splits if tmp_path / "b.png" in s.image_paths]
    with pytest.raises(UnreadableImageError, match="5x5 but its annotations say 32x32"):
        split.load(split.image_paths.index(tmp_path / "b.png"))


# ----------------------------------------------------------------------------- transforms


def rectangles() -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """Filled rectangles, one per colour channel (overlaps stay separable), and their boxes."""
    boxes = np.array([[5, 8, 30, 40], [40, 20, 75, 60], [70, 2, 78, 9]], dtype=np.float32)
    pixels = np.zeros((64, 80, 3), dtype=np.uint8)
    for channel, (x1, y1, x2, y2) in enumerate(boxes.astype(int)):
        pixels[y1:y2, x1:x2, channel] = 255
    return Image.fromarray(pixels), boxes, np.array([1, 2, 3])


def denormalize(image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((image * std + mean) * 255).numpy()


def extent(channel: np.ndarray) -> np.ndarray | None:
    """The xyxy extent (pixel edges) of the pixels more than half lit, or None."""
    lit = channel > 127.5
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if not len(rows):
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def test_boxes_follow_pixels_through_train_transform() -> None:
    image, boxes, labels = rectangles()
    transform = create_det_train_transform(48, MEAN, STD, hflip=0.5, scale=(0.15, 1.0))
    dropped, flipped = 0, 0
    for seed in range(10):
        torch.manual_seed(seed)
        out, target = transform(image, boxes, labels, np.array([0, 1, 0]))
        assert out.shape == (3, 48, 48) and out.dtype == torch.float32
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert type(target["boxes"]) is torch.Tensor
        pixels = denormalize(out)
        kept = dict(zip(target["labels"].tolist(), target["boxes"].numpy(), strict=True))
        np.testing.assert_array_equal(target["iscrowd"].numpy(), target["labels"].numpy() == 2)
        for label in (1, 2, 3):
            found = extent(pixels[label - 1])
            if label not in kept:
                dropped += 1  # cropped away, or under 1 px: nothing (or a sliver) visible
                assert found is None or min(found[2] - found[0], found[3] - found[1]) <= 1
                continue
            box = kept[label]
            assert (box >= 0).all() and (box <= 48).all()
            assert found is not None, (seed, label, box)
            np.testing.assert_allclose(box, found, atol=1.0, err_msg=f"seed {seed}")
        if 1 in kept and 2 in kept:
            flipped += kept[1][0] > kept[2][0]  # rectangle 1 is left of 2 unless flipped
    assert dropped > 0 and flipped > 0  # the crop dropped boxes, the flip mirrored some


def test_eval_transform_scales_boxes_and_keeps_them_all() -> None:
    image, boxes, labels = rectangles()
    out, target = create_det_eval_transform(32, MEAN, STD)(image, boxes, labels)
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(
        target["boxes"].numpy(), boxes * [32 / 80, 32 / 64, 32 / 80, 32 / 64]
    )
    np.testing.assert_array_equal(target["labels"].numpy(), labels)
    np.testing.assert_array_equal(target["iscrowd"].numpy(), [0, 0, 0])
    tiny = np.array([[0, 0, 1, 1]], dtype=np.float32)  # under 1 px once resized: still kept
    assert len(create_det_eval_transform(32, MEAN, STD)(image, tiny, [1])[1]["boxes"]) == 1
    plain = create_det_train_transform(32, MEAN, STD, hflip=0.0, scale=None)  # augment=none
    out_plain, target_plain = plain(image, np.concatenate([boxes, tiny]), [1, 2, 3, 2])
    torch.testing.assert_close(out_plain, out)
    np.testing.assert_array_equal(target_plain["labels"].numpy(), [1, 2, 3])  # tiny dropped


# ----------------------------------------------------------------------------- few-shot


def test_images_per_class_is_seeded_and_covers_every_class() -> None:
    rng = np.random.default_rng(0)
    labels = [rng.integers(1, 5, rng.integers(0, 4)) for _ in range(60)]
    labels += [np.array([5])] * 2  # a rare class: all of it is used
    pool = np.arange(len(labels))
    names = ("background", "a", "b", "c", "d", "e")
    chosen = sample_images_per_class(labels, pool, seed=1, per_class=3, class_names=names)
    again = sample_images_per_class(labels, pool, seed=1, per_class=3, class_names=names)
    other = sample_images_per_class(labels, pool, seed=2, per_class=3, class_names=names)
    np.testing.assert_array_equal(chosen, again)
    assert not np.array_equal(chosen, other)
    for c in range(1, 6):
        having = sum(c in labels[i] for i in chosen)
        assert having >= min(3, sum(c in lab for lab in labels))
    assert all(len(labels[i]) for i in chosen)  # images without boxes never chosen
    assert len(chosen) < 15


# ----------------------------------------------------------------------------- data module


def test_datamodule_batches_follow_the_detection_contract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path))  # the scenes' cache
    config = {"mean": MEAN, "std": STD, "input_size": (3, 224, 224)}
    datamodule = DetectionDataModule(
        "fmnist_scenes",
        image_size=32,
        batch_size=4,
        data_config=config,
        augment={"name": "basic", "scale": [0.7, 1.0], "hflip": 0.5},
        images_per_class=2,
        seed=5,
    )
    datamodule.setup()
    assert datamodule.class_names == SCENE_CLASSES and datamodule.num_classes == 11
    summary = datamodule.summary()
    assert summary["val_size"] == 100 and summary["test_size"] == 200
    assert 5 <= summary["train_size"] <= 20 and summary["input_size"] == "3x32x32"
    for loader in (datamodule.train_dataloader(), datamodule.val_dataloader()):
        batch = next(iter(loader))
        assert set(batch) == {"image", "target"}
        images, targets = batch["image"], batch["target"]
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert isinstance(targets, list) and len(targets) == len(images)
        for target in targets:
            assert set(target) == {"boxes", "labels", "iscrowd", "image_id"}
            boxes, labels = target["boxes"], target["labels"]
            assert boxes.dtype == torch.float32 and boxes.shape == (len(labels), 4)
            assert labels.dtype == torch.int64 and ((labels >= 1) & (labels <= 10)).all()
            assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all()
            assert (boxes <= 32).all() and isinstance(target["image_id"], int)
    fingerprint = datamodule.fingerprint()
    assert len(fingerprint) == 16
    again = DetectionDataModule(
        "fmnist_scenes", image_size=32, batch_size=4, data_config=config, images_per_class=2, seed=5
    )
    again.setup()
    np.testing.assert_array_equal(again.train_set.indices, datamodule.train_set.indices)
    assert again.fingerprint() == fingerprint


def test_coco_datamodule_few_images_and_collate(tmp_path: Path) -> None:
    path = tiny_coco(tmp_path)
    datamodule = DetectionDataModule(
        "coco",
        annotations=str(path),
        image_size=24,
        batch_size=2,
        train_images=1,
        seed=0,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    datamodule.setup()
    assert datamodule.class_names == ("background", "dog", "cat", "bird")
    assert len(datamodule.train_set) == 1 and len(datamodule.val_set) == 1
    batch = next(iter(datamodule.test_dataloader()))
    assert batch["image"].shape == (1, 3, 24, 24) and len(batch["target"]) == 1
    first = datamodule.fingerprint()
    other = DetectionDataModule(
        "coco",
        annotations=str(path),
        image_size=24,
        batch_size=2,
        train_images=1,
        seed=3,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    other.setup()
    assert other.fingerprint() != first
    merged = detection_collate([datamodule.val_set[0], datamodule.test_set[0]])
    assert merged["image"].shape == (2, 3, 24, 24) and len(merged["target"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "cifar10"}, "not a detection source"),
        ({"images_per_class": 2, "samples_per_class": 3}, "mean the same"),
        ({"images_per_class": 2, "train_images": 3}, "set one of them"),
        ({"train_images": 0}, "data.train_images=0"),
        ({"augment": {"name": "randaugment"}}, "not available for detection"),
        ({"augment": {"name": "basic", "scale": [0.9, 0.2]}}, "augment.scale"),
        ({"strict": "yes"}, "data.strict"),
        ({"val_fraction": 1.5}, "data.val_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "leave no training images"),
    ],
)
def test_datamodule_rejects_bad_keys(kwargs: dict, match: str) -> None:
    options = {"source": "fmnist_scenes", "batch_size": 2} | kwargs
    message = one_line(DetectionDataModule, **options)
    assert match in message, message


def test_scenes_reject_coco_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datamodule = DetectionDataModule("fmnist_scenes", annotations="x.json", batch_size=2)
    assert "data.annotations is for data.source=coco" in one_line(datamodule.setup)
    assert "data.annotations" in one_line(DetectionDataModule("coco", batch_size=2).setup)


def test_boxed_arrays_validate() -> None:
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="box arrays"):
        BoxedArrays(images, (np.zeros((1, 4)),), (np.ones(1),), ("background", "a"))
    with pytest.raises(ValueError, match="labels"):
        BoxedArrays(images, (np.zeros((1, 4)),) * 2, (np.ones(2),) * 2, ("background", "a"))
