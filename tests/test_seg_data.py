"""Segmentation data: generated scenes, paired transforms, the user folder layout, batches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.data.seg_dataset import SegmentationDataset
from transferlab.data.seg_transforms import create_seg_eval_transform, create_seg_train_transform
from transferlab.data.segmentation import (
    IGNORE_INDEX,
    SCENE_CLASSES,
    MaskedArrays,
    fmnist_scenes,
    scenes_cache_path,
    seg_folder,
)
from transferlab.data.sources import fashion_mnist
from transferlab.errors import UserError

SMALL = {"train_scenes": 12, "val_scenes": 6, "test_scenes": 8, "size": 48}
COUNTS = {"train": 12, "val": 6, "test": 8}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def scene_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("scenes")


@pytest.fixture(scope="module")
def scenes(scene_cache: Path):
    return fmnist_scenes(seed=3, cache_dir=scene_cache, **SMALL)


# ----------------------------------------------------------------------------- fmnist_scenes


def test_scenes_shapes_classes_and_foreground(scenes) -> None:
    *splits, names = scenes
    assert names == SCENE_CLASSES and len(names) == 11 and names[0] == "background"
    assert names[1:3] == ("T-shirt/top", "Trouser")
    for split, count in zip(splits, COUNTS.values(), strict=True):
        assert len(split) == count and split.class_names == names
        assert split.images.shape == (count, 48, 48, 3) and split.images.dtype == np.uint8
        assert split.masks.shape == (count, 48, 48)
        assert set(np.unique(split.masks)) <= set(range(11))
        assert (split.masks.reshape(count, -1) > 0).any(axis=1).all()
        image, mask = split.load(0)
        assert image.mode == "RGB" and image.size == (48, 48)
        assert mask.dtype == np.int64 and mask.shape == (48, 48)
    all_masks = np.concatenate([s.masks for s in splits])
    assert len(np.unique(all_masks)) > 5  # many classes appear, not one


def test_scenes_items_are_visible(scenes) -> None:
    train = scenes[0]
    fg = train.masks > 0
    colour = train.images.astype(np.float32)
    # Items are tinted: foreground pixels are far more saturated than the (mostly gray) photos.
    saturation = colour.max(axis=3) - colour.min(axis=3)
    assert saturation[fg].mean() > saturation[~fg].mean() + 30


def test_scenes_deterministic_and_seeded(scenes, tmp_path: Path) -> None:
    again = fmnist_scenes(seed=3, cache_dir=tmp_path, **SMALL)  # regenerated, not read
    for first, second in zip(scenes[:3], again[:3], strict=True):
        np.testing.assert_array_equal(first.images, second.images)
        np.testing.assert_array_equal(first.masks, second.masks)
        np.testing.assert_array_equal(first.items, second.items)
    other = fmnist_scenes(seed=4, cache_dir=tmp_path, **SMALL)
    assert not np.array_equal(other[0].images, scenes[0].images)
    assert not np.array_equal(other[0].items, scenes[0].items)


def test_scenes_item_pools_disjoint(scenes) -> None:
    train, val, test, _ = scenes
    fmnist = fashion_mnist(download=False)
    used = {}
    for name, split in (("train", train), ("val", val), ("test", test)):
        items = split.items
        per_scene = (items >= 0).sum(axis=1)
        assert ((per_scene >= 2) & (per_scene <= 5)).all()
        used[name] = items[items >= 0]
        assert len(np.unique(used[name])) == len(used[name])  # no item twice
        labels = (fmnist.test if name == "test" else fmnist.train).labels
        for scene, row in enumerate(items):
            classes = set(labels[row[row >= 0]] + 1)
            present = set(np.unique(split.masks[scene])) - {0}
            assert present <= classes  # the mask holds only the recorded items' classes
            assert labels[row[row >= 0][-1]] + 1 in present  # the last item is on top
    assert not set(used["train"]) & set(used["val"])  # both index the official train images
    assert used["test"].max() < 10_000  # indices into the official test images


def test_scene_cache_written_reused_and_regenerated(scenes, scene_cache: Path) -> None:
    path = scenes_cache_path(3, COUNTS, 48, scene_cache)
    assert path.is_file() and path.suffix == ".npz"
    assert "seed3" in path.name and "n12-6-8" in path.name and "s48" in path.name
    assert "_v1_" in path.name
    stamp = path.stat().st_mtime_ns
    os.utime(path, ns=(stamp - 10**9, stamp - 10**9))
    stamp = path.stat().st_mtime_ns
    cached = fmnist_scenes(seed=3, cache_dir=scene_cache, **SMALL)
    assert path.stat().st_mtime_ns == stamp  # read, not rewritten
    np.testing.assert_array_equal(cached[0].masks, scenes[0].masks)
    np.testing.assert_array_equal(cached[2].images, scenes[2].images)

    path.write_bytes(path.read_bytes()[:500])  # truncated: corrupt
    fixed = fmnist_scenes(seed=3, cache_dir=scene_cache, **SMALL)
    np.testing.assert_array_equal(fixed[1].images, scenes[1].images)
    assert path.stat().st_mtime_ns != stamp and path.stat().st_size > 500
    path.write_bytes(b"not a zip file at all")
    fixed = fmnist_scenes(seed=3, cache_dir=scene_cache, **SMALL)
    np.testing.assert_array_equal(fixed[0].masks, scenes[0].masks)


def test_scenes_cache_dir_honours_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TRANSFERLAB_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = scenes_cache_path(0, {"train": 400, "val": 100, "test": 200}, 128)
    assert path.parent == tmp_path / "transferlab" / "fmnist_scenes"


def test_scenes_missing_fashion_mnist_is_a_user_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from transferlab.data import sources

    monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST", tmp_path / "nowhere")
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="Fashion-MNIST not found") as info:
        fmnist_scenes(seed=9, cache_dir=tmp_path, download=False, **SMALL)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- transforms


def coded_pair(height: int = 64, width: int = 80) -> tuple[Image.Image, np.ndarray]:
    """A mask of uneven blocks (no mirror symmetry) and an image whose channels encode it."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, 10:30] = 1
    mask[:, 30:34] = 2
    mask[20:50, 50:75] = 3
    mask[50:, :20] = 4
    mask[5:12, 60:70] = IGNORE_INDEX
    code = mask.astype(np.int64) * 20 % 256
    pixels = np.stack([code, 255 - code, np.full_like(code, 7)], axis=2)
    return Image.fromarray(pixels.astype(np.uint8)), mask


def denormalize(image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return torch.round((image * std + mean) * 255).to(torch.int64).numpy()


def interior(mask: np.ndarray, margin: int) -> np.ndarray:
    """Pixels whose (2*margin+1)^2 neighbourhood has their own class only."""
    padded = np.pad(mask, margin, mode="edge")
    same = np.ones(mask.shape, dtype=bool)
    for dy in range(2 * margin + 1):
        for dx in range(2 * margin + 1):
            same &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]] == mask
    return same


@pytest.mark.parametrize("seed", range(8))
def test_mask_follows_image_through_train_transform(seed: int) -> None:
    image, mask = coded_pair()
    transform = create_seg_train_transform(48, MEAN, STD, hflip=0.5, scale=(0.3, 1.0))
    torch.manual_seed(seed)
    out_image, out_mask = transform(image, mask)
    assert out_image.dtype == torch.float32 and out_image.shape == (3, 48, 48)
    assert out_mask.dtype == torch.int64 and out_mask.shape == (48, 48)
    assert type(out_image) is torch.Tensor and type(out_mask) is torch.Tensor
    labels = out_mask.numpy()
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4, IGNORE_INDEX}  # never interpolated
    pixels = denormalize(out_image)
    inside = interior(labels, 2)
    assert inside.sum() > 200
    np.testing.assert_array_equal(pixels[0][inside], (labels[inside] * 20) % 256)
    np.testing.assert_array_equal(pixels[1][inside], 255 - (labels[inside] * 20) % 256)
    assert (pixels[2] == 7).all()


def test_train_transform_flip_alone_mirrors_mask() -> None:
    image, mask = coded_pair(48, 48)
    flip = create_seg_train_transform(48, MEAN, STD, hflip=1.0, scale=(1.0, 1.0))
    keep = create_seg_train_transform(48, MEAN, STD, hflip=0.0, scale=(1.0, 1.0))
    torch.manual_seed(0)
    flipped_image, flipped = flip(image, mask)
    _, kept = keep(image, mask)
    np.testing.assert_array_equal(kept.numpy(), mask)
    width = mask.shape[1]
    for x in range(width):
        np.testing.assert_array_equal(flipped[:, x].numpy(), mask[:, width - 1 - x])
    np.testing.assert_array_equal(
        denormalize(flipped_image)[0], (mask[:, ::-1].astype(np.int64) * 20) % 256
    )


def test_eval_transform_resizes_mask_nearest() -> None:
    image, mask = coded_pair(64, 80)
    out_image, out_mask = create_seg_eval_transform(32, MEAN, STD)(image, mask)
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32)
    assert out_mask.dtype == torch.int64
    # Pixel-centre nearest neighbour: output pixel y takes source row floor((y + 0.5) * scale).
    ys = np.floor((np.arange(32) + 0.5) * 64 / 32).astype(int)
    xs = np.floor((np.arange(32) + 0.5) * 80 / 32).astype(int)
    labels = out_mask.numpy()
    np.testing.assert_array_equal(labels, mask[np.ix_(ys, xs)])  # picked, not blended
    inside = interior(labels, 2)
    np.testing.assert_array_equal(denormalize(out_image)[0][inside], labels[inside] * 20 % 256)


# ----------------------------------------------------------------------------- seg_folder


def write_pair(
    root: Path, stem: str, size: tuple[int, int], top: int, rng: np.random.Generator
) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "images" / f"{stem}.jpg")
    labels = rng.integers(0, top + 1, (size[1], size[0]), dtype=np.uint8)
    labels[0, 0] = top
    Image.fromarray(labels, mode="L").save(root / "masks" / f"{stem}.png")


def make_seg_folder(root: Path, count: int = 10, top: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(count):
        write_pair(root, f"img{i:02d}", (20 + i, 16), top, rng)
    return root


def one_line_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        seg_folder(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and match in message, message
    return message


def test_seg_folder_flat_layout_carves_seeded_splits(tmp_path: Path) -> None:
    root = make_seg_folder(tmp_path, count=20, top=2)
    train, val, test, names = seg_folder(root, split_seed=1, val_fraction=0.1, test_fraction=0.2)
    assert names == ("class_0", "class_1", "class_2")
    assert (len(train), len(val), len(test)) == (14, 2, 4)
    stems = [{p.stem for p in s.image_paths} for s in (train, val, test)]
    assert not (stems[0] & stems[1]) and not (stems[0] & stems[2]) and not (stems[1] & stems[2])
    again = seg_folder(root, split_seed=1)
    assert again[1].image_paths == val.image_paths
    other = seg_folder(root, split_seed=2)
    assert other[2].image_paths != test.image_paths
    image, mask = train.load(0)
    assert image.mode == "RGB" and mask.dtype == np.int64
    assert mask.shape == (image.size[1], image.size[0])
    assert train.mask_paths[0].stem == train.image_paths[0].stem


def test_seg_folder_classes_txt_palette_and_ignore(tmp_path: Path) -> None:
    root = make_seg_folder(tmp_path, count=6, top=1)
    (root / "classes.txt").write_text("background\nroad\ncar\n\n")
    labels = np.array([[0, 2, 2, 255], [1, 1, 0, 255]], dtype=np.uint8)
    palette = Image.fromarray(labels, mode="P")
    colours = [0, 0, 0, 200, 10, 10, 10, 200, 10] + [255, 255, 255] * 253
    palette.putpalette(colours)
    palette.save(root / "masks" / "pal.png")
    Image.fromarray(np.zeros((2, 4, 3), np.uint8)).save(root / "images" / "pal.png")
    train, val, test, names = seg_folder(root, split_seed=0, val_fraction=0.2, test_fraction=0.2)
    assert names == ("background", "road", "car")
    everything = [*zip(train.image_paths, train.mask_paths, strict=True)]
    everything += zip(val.image_paths, val.mask_paths, strict=True)
    everything += zip(test.image_paths, test.mask_paths, strict=True)
    assert len(everything) == 7
    for split in (train, val, test):
        for i, path in enumerate(split.mask_paths):
            if path.name == "pal.png":
                _, mask = split.load(i)
                np.testing.assert_array_equal(mask, labels)  # indices, not colours


def test_seg_folder_split_subfolders(tmp_path: Path) -> None:
    make_seg_folder(tmp_path / "train", count=10, top=3, seed=1)
    make_seg_folder(tmp_path / "val", count=3, top=1, seed=2)
    train, val, test, names = seg_folder(tmp_path, split_seed=0, test_fraction=0.2)
    assert len(names) == 4
    assert len(val) == 3 and all(p.parent == tmp_path / "val" / "images" for p in val.image_paths)
    assert (len(train), len(test)) == (8, 2)  # test carved from train
    assert all(p.parent == tmp_path / "train" / "images" for p in test.image_paths)
    make_seg_folder(tmp_path / "test", count=4, top=2, seed=3)
    train, val, test, _ = seg_folder(tmp_path)
    assert (len(train), len(val), len(test)) == (10, 3, 4)


def test_seg_folder_fingerprint_covers_masks(tmp_path: Path) -> None:
    import hashlib

    root = make_seg_folder(tmp_path, count=4, top=2)
    train, *_ = seg_folder(root, val_fraction=0.25, test_fraction=0.25)

    def fingerprint(images) -> str:
        digest = hashlib.sha256()
        images.update_hash(digest, np.arange(len(images)))
        return digest.hexdigest()

    before = fingerprint(train)
    path = train.mask_paths[0]
    labels = np.asarray(Image.open(path)).copy()
    labels[1, 1] = 1 - min(labels[1, 1], 1)
    Image.fromarray(labels, mode="L").save(path)
    after = fingerprint(seg_folder(root, val_fraction=0.25, test_fraction=0.25)[0])
    assert before != after


def test_seg_folder_image_without_mask(tmp_path: Path) -> None:
    root = make_seg_folder(tmp_path, count=5)
    (root / "masks" / "img03.png").unlink()
    message = one_line_error("img03.jpg", root)
    assert "img03.png" in message and "no mask" in message


def test_seg_folder_mask_without_image_is_ignored(tmp_path: Path) -> None:
    root = make_seg_folder(tmp_path, count=5)
    (root / "images" / "img03.jpg").unlink()
    train, val, test, _ = seg_folder(root, val_fraction=0.2, test_fraction=0.2)
    assert len(train) + len(val) + len(test) == 4


def test_seg_folder_size_mismatch(tmp_path: Path) -> None:
    root = make_seg_folder(tmp_path, count=5)
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(root / "masks" / "img02.png")
    message = one_line_error("img02.png", root)
    assert "img02.jpg" in message and "9x9" in message


def test_seg_folder_index_above_declared_classes(tmp_path: Path) -> None:
    root = make_seg_folder(tmp_path, count=5, top=2)
    (root / "classes.txt").write_text("background\nthing\n")
    message = one_line_error("classes.txt", root)
    assert "img0" in message and "index 2" in message
    (root / "classes.txt").unlink()
    one_line_error("num_classes", root, num_classes=2)
    assert seg_folder(root, num_classes=3)[3] == ("class_0", "class_1", "class_2")


def test_seg_folder_corrupt_mask(tmp_path: Path) -> None:
    root = make_seg_folder(tmp_path, count=5)
    (root / "masks" / "img01.png").write_bytes(b"\x89PNG not really")
    message = one_line_error("img01.png", root)
    assert "cannot decode mask" in message


def test_seg_folder_missing_folders(tmp_path: Path) -> None:
    root = make_seg_folder(tmp_path / "data", count=5)
    for mask in (root / "masks").iterdir():
        mask.unlink()
    (root / "masks").rmdir()
    assert "masks" in one_line_error("is missing", root)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    assert str(empty / "images") in one_line_error("has no images", empty)
    one_line_error("does not exist", tmp_path / "nope")


# ----------------------------------------------------------------------------- dataset


def test_segmentation_dataset_batches(scenes) -> None:
    train = scenes[0]
    transform = create_seg_train_transform(32, MEAN, STD)
    dataset = SegmentationDataset(train, np.arange(1, 9), transform)
    assert len(dataset) == 8
    sample = dataset[0]
    assert set(sample) == {"image", "mask"}
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
        assert batch["mask"].shape == (4, 32, 32) and batch["mask"].dtype == torch.int64
        assert int(batch["mask"].max()) <= 10
    # No transform randomness on the eval side: the same scene gives the same sample.
    evaluate = SegmentationDataset(train, np.arange(3), create_seg_eval_transform(48, MEAN, STD))
    np.testing.assert_array_equal(evaluate[1]["mask"].numpy(), train.masks[1])


def test_masked_arrays_validates_shapes() -> None:
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="do not match"):
        MaskedArrays(images, np.zeros((2, 8, 9), np.uint8), ("a",))
