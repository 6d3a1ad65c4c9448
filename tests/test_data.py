"""Data: sources, seeded splits, few-shot sampling, transforms, fingerprints."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.data import TransferDataModule
from transferlab.data import sources as data_sources
from transferlab.data.datamodule import resolve_num_workers, resolve_pin_memory, usable_cores
from transferlab.data.datasets import to_mode
from transferlab.data.sources import load_source
from transferlab.data.transforms import (
    ToNormalizedTensor,
    _timm_eval_transform,
    create_eval_transform,
    create_train_transform,
    resolve_data_config,
)
from transferlab.errors import UserError

# tf_efficientnet_lite0's resolved timm data config.
LITE0 = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.875,
    "crop_mode": "center",
}
CLASSES = ("cat", "dog", "fox")
MODES = ("L", "RGB", "RGBA", "P")


def write_image(path: Path, rng: np.random.Generator, mode: str, size: tuple[int, int]) -> None:
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    if path.suffix == ".jpg" and mode not in ("L", "RGB"):
        image = image.convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def make_folder(root: Path, per_class: int = 8, classes=CLASSES, seed: int = 0) -> Path:
    """Class sub-folders of images with mixed sizes, modes (L, RGB, RGBA, P) and formats."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        for i in range(per_class):
            mode = MODES[(i + c) % len(MODES)]
            suffix = ".jpg" if i % 3 == 0 else ".png"
            size = (int(rng.integers(12, 60)), int(rng.integers(12, 60)))
            write_image(root / name / f"img{i}{suffix}", rng, mode, size)
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "images")


def all_batches(loader):
    return list(loader)


def test_image_folder_seeded_split_gives_normalized_batches(folder: Path):
    dm = TransferDataModule(
        "image_folder", root=str(folder), image_size=32, batch_size=5, data_config=LITE0, seed=1
    )
    dm.setup("fit")
    assert dm.num_classes == 3 and dm.class_names == CLASSES
    sizes = (len(dm.train_set), len(dm.val_set), len(dm.test_set))
    assert sum(sizes) == 24 and all(n > 0 for n in sizes)
    # Stratified: every class in every split.
    for dataset in (dm.train_set, dm.val_set, dm.test_set):
        assert set(dataset.labels.tolist()) == {0, 1, 2}
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for batch in all_batches(loader):
            x, y = batch["image"], batch["label"]
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
            assert x.shape[0] == y.shape[0] <= loader.batch_size
            assert -1.0 <= x.min() < 0.0 < x.max() <= 1.0  # mean = std = 0.5 normalization
    assert dm.eval_batch_size == 10
    seen = torch.cat([batch["label"] for batch in all_batches(dm.train_dataloader())])
    assert sorted(seen.tolist()) == sorted(dm.train_set.labels.tolist())


def test_image_folder_uses_train_val_test_subfolders(tmp_path: Path):
    make_folder(tmp_path / "train", per_class=5)
    make_folder(tmp_path / "valid", per_class=2, seed=1)
    make_folder(tmp_path / "test", per_class=3, seed=2)
    dm = TransferDataModule("image_folder", root=str(tmp_path), image_size=16, val_fraction=0.5)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 6, 9)
    assert {p.parent.parent.name for p in dm.val_set.images.paths} == {"valid"}
    assert {p.parent.parent.name for p in dm.test_set.images.paths} == {"test"}
    x = next(iter(dm.val_dataloader()))["image"]
    assert x.shape == (6, 3, 16, 16)


def test_classes_differing_between_splits_are_named(tmp_path: Path):
    make_folder(tmp_path / "train", per_class=2)
    make_folder(tmp_path / "test", per_class=2, classes=("cat", "dog", "wolf"))
    with pytest.raises(UserError, match=r"test .*lacks fox.*extra wolf"):
        load_source("image_folder", root=tmp_path)


def test_corrupt_image_is_named(folder: Path):
    bad = folder / "dog" / "broken.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    dm = TransferDataModule("image_folder", root=str(folder), image_size=16)
    with pytest.raises(UserError, match=r"broken\.jpg.*remove or replace"):
        dm.setup()


def test_image_failing_to_decode_later_is_named(folder: Path):
    # A valid header with a cut-off body passes the setup check and fails in __getitem__.
    path = folder / "fox" / "cut.jpg"
    data = (folder / "fox" / "img0.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    dm = TransferDataModule("image_folder", root=str(folder), image_size=16)
    dm.setup()
    datasets = (dm.train_set, dm.val_set, dm.test_set)
    where = next(
        (d, i) for d in datasets for i, j in enumerate(d.indices) if d.images.paths[j] == path
    )
    with pytest.raises(UserError, match=r"cut\.jpg.*remove or replace"):
        where[0][where[1]]
    # Raised in a DataLoader worker, it is still one line.
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(where[0], [where[1]]), num_workers=1
    )
    batches = iter(loader)
    with pytest.raises(UserError) as raised:
        next(batches)
    assert "\n" not in str(raised.value) and "cut.jpg" in str(raised.value)
    assert list(batches) == []  # drained, the worker exits at once


def test_missing_root_and_empty_class(tmp_path: Path, folder: Path):
    with pytest.raises(UserError, match=r"data.root=.*nope does not exist"):
        TransferDataModule("image_folder", root=str(tmp_path / "nope")).setup()
    (folder / "empty").mkdir()
    (folder / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"empty has no images"):
        load_source("image_folder", root=folder)
    with pytest.raises(UserError, match=r"unknown data source 'mnits'.*digits"):
        load_source("mnits")


def test_few_shot_is_deterministic_and_disjoint_from_val_and_test():
    def picked(seed: int, k: int = 3):
        dm = TransferDataModule(
            "digits", samples_per_class=k, val_per_class=4, seed=seed, image_size=8
        )
        dm.setup()
        return dm

    a, b, c = picked(0), picked(0), picked(1)
    assert np.array_equal(a.train_set.indices, b.train_set.indices)
    assert np.array_equal(a.val_set.indices, b.val_set.indices)
    assert not np.array_equal(a.train_set.indices, c.train_set.indices)
    assert np.bincount(a.train_set.labels).tolist() == [3] * 10
    assert np.bincount(a.val_set.labels).tolist() == [4] * 10
    splits = [set(a.train_set.indices), set(a.val_set.indices), set(a.test_set.indices)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    # The held-out test set does not move with the seed; a larger subset extends a smaller one.
    assert np.array_equal(a.test_set.indices, c.test_set.indices)
    assert set(a.train_set.indices) <= set(picked(0, k=6).train_set.indices)


def test_too_few_images_for_samples_per_class_warns(folder: Path, caplog):
    dm = TransferDataModule("image_folder", root=str(folder), samples_per_class=50, image_size=16)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert "samples_per_class=50" in caplog.text and "cat" in caplog.text
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 24


def test_fashion_mnist_from_debian_package():
    # `make test` installs Debian's dataset-fashion-mnist; this checks it is found there.
    assert data_sources.find_idx_files(data_sources.SYSTEM_FASHION_MNIST) is not None
    raw = load_source("fashion_mnist", download=False)
    assert raw.train.images.shape == (60000, 28, 28) and len(raw.test) == 10000
    assert raw.class_names[:2] == ("T-shirt/top", "Trouser") and len(raw.class_names) == 10
    assert np.bincount(raw.test.labels).tolist() == [1000] * 10
    dm = TransferDataModule("fashion_mnist", samples_per_class=5, val_per_class=2, image_size=28)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50, 20, 10000)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (32, 3, 28, 28) and batch["label"].max() < 10


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_root_in_torchvision_layout(tmp_path: Path):
    raw_dir = tmp_path / "FashionMNIST" / "raw"
    raw_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_idx(raw_dir / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)))
    write_idx(raw_dir / "train-labels-idx1-ubyte", np.arange(30) % 10)
    write_idx(raw_dir / "t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28)))
    write_idx(raw_dir / "t10k-labels-idx1-ubyte.gz", np.arange(10))
    raw = load_source("fashion_mnist", root=tmp_path, download=False)
    assert (len(raw.train), len(raw.test)) == (30, 10)
    assert raw.train.labels.tolist() == (np.arange(30) % 10).tolist()


def test_fashion_mnist_missing_says_what_to_do(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(data_sources, "SYSTEM_FASHION_MNIST", tmp_path / "system")
    monkeypatch.setenv("TRANSFERLAB_DATA", str(tmp_path / "cache"))
    with pytest.raises(
        UserError, match=r"not found in .*system.*apt-get install dataset-fashion-mnist"
    ):
        load_source("fashion_mnist", root=tmp_path / "mine", download=False)


def test_cifar10_offline_says_what_to_do(tmp_path: Path):
    with pytest.raises(UserError, match=r"CIFAR-10 not found .*data.root=DIR"):
        load_source("cifar10", root=tmp_path, download=False)


def test_digits_end_to_end():
    dm = TransferDataModule("digits", image_size=16, batch_size=16, data_config=LITE0)
    dm.setup()
    assert dm.num_classes == 10 and dm.class_names[0] == "0"
    assert len(dm.test_set) == pytest.approx(0.2 * 1797, abs=10)
    assert len(dm.train_set) + len(dm.val_set) + len(dm.test_set) == 1797
    assert set(dm.test_set.labels.tolist()) == set(range(10))
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (16, 3, 16, 16) and batch["label"].dtype == torch.int64
    assert dm.summary() == {
        "source": "digits",
        "num_classes": 10,
        "train_size": len(dm.train_set),
        "val_size": len(dm.val_set),
        "test_size": len(dm.test_set),
        "input_size": "3x16x16",
        "augment": "none",
    }


def test_setup_is_idempotent():
    dm = TransferDataModule("digits", image_size=8)
    dm.setup("fit")
    train_set = dm.train_set
    dm.setup("test")
    assert dm.train_set is train_set


def test_augment_shapes_and_none_equals_eval(folder: Path):
    config = resolve_data_config(LITE0, image_size=24)
    image = to_mode(Image.open(folder / "cat" / "img1.png"), "RGB")
    eval_out = create_eval_transform(config)(image)
    assert eval_out.shape == (3, 24, 24)
    assert torch.equal(create_train_transform(config, {"name": "none"})(image), eval_out)
    for name in ("basic", "randaugment"):
        train = create_train_transform(config, {"name": name, "scale": [0.5, 1.0], "hflip": 0.5})
        outs = [train(image) for _ in range(4)]
        assert all(o.shape == (3, 24, 24) and o.dtype == torch.float32 for o in outs)
        assert any(not torch.equal(o, eval_out) for o in outs)  # it does augment
    dm = TransferDataModule(
        "image_folder", root=str(folder), image_size=24, augment={"name": "basic"}, batch_size=4
    )
    dm.setup()
    x = next(iter(dm.train_dataloader()))["image"]
    assert x.shape == (4, 3, 24, 24)


def test_unknown_augment_lists_the_options():
    with pytest.raises(UserError, match=r"'mixup'.*none, basic, randaugment"):
        TransferDataModule("digits", augment={"name": "mixup"})
    with pytest.raises(UserError, match=r"unknown augment option.*hflp"):
        TransferDataModule("digits", augment={"name": "basic", "hflp": 0.5})


def test_image_size_overrides_the_backbone_size(folder: Path):
    image = to_mode(Image.open(folder / "dog" / "img0.jpg"), "RGB")
    assert create_eval_transform(resolve_data_config(LITE0))(image).shape == (3, 224, 224)
    for size in (20, 40):
        dm = TransferDataModule(
            "image_folder", root=str(folder), image_size=size, data_config=LITE0
        )
        dm.setup()
        x = next(iter(dm.val_dataloader()))["image"]
        assert x.shape[1:] == (3, size, size)


def test_one_channel_backbone_and_odd_modes():
    one_channel = {**LITE0, "input_size": (1, 224, 224)}
    dm = TransferDataModule("digits", image_size=12, data_config=one_channel, batch_size=4)
    dm.setup()
    x = next(iter(dm.train_dataloader()))["image"]
    assert x.shape == (4, 1, 12, 12)
    deep = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert deep.mode == "I;16"
    assert np.asarray(to_mode(deep, "RGB"))[0, :, 0].tolist() == [0, 128, 255]
    rgba = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    assert to_mode(rgba, "L").mode == "L" and to_mode(rgba, "RGB").getpixel((0, 0)) == (10, 20, 30)


def test_fingerprint_is_stable_and_follows_the_selection():
    def fingerprint(**kwargs) -> str:
        dm = TransferDataModule("digits", image_size=8, samples_per_class=5, **kwargs)
        dm.setup()
        return dm.fingerprint()

    first = fingerprint(seed=0)
    assert first == fingerprint(seed=0)
    assert len(first) == 16 and int(first, 16) >= 0
    assert first != fingerprint(seed=1)
    assert first != fingerprint(seed=0, val_per_class=3)


def test_file_fingerprint_uses_paths_relative_to_root(tmp_path: Path):
    a = make_folder(tmp_path / "a", per_class=3)
    b = make_folder(tmp_path / "b", per_class=3)
    prints = []
    for root in (a, b):
        dm = TransferDataModule("image_folder", root=str(root), image_size=8, val_fraction=0.3)
        dm.setup()
        prints.append(dm.fingerprint())
    assert prints[0] == prints[1]
    (b / "cat" / "img0.jpg").rename(b / "cat" / "renamed.jpg")
    dm = TransferDataModule("image_folder", root=str(b), image_size=8, val_fraction=0.3)
    dm.setup()
    assert dm.fingerprint() != prints[0]


@pytest.mark.parametrize("channels", [1, 3])
def test_fused_to_tensor_matches_torchvision_exactly(channels: int) -> None:
    config = resolve_data_config({"input_size": (channels, 8, 8)}, image_size=24)
    fused, reference = create_eval_transform(config), _timm_eval_transform(config)
    assert any(isinstance(step, ToNormalizedTensor) for step in fused.transforms)
    rng = np.random.default_rng(0)
    for shape in ((30, 41), (17, 17)):
        pixels = rng.integers(0, 256, (*shape, 3) if channels == 3 else shape, dtype=np.uint8)
        image = Image.fromarray(pixels)
        assert torch.equal(fused(image), reference(image))


@pytest.mark.parametrize("augment", ["basic", "randaugment"])
def test_train_transforms_are_fused_too(augment: str) -> None:
    transform = create_train_transform(resolve_data_config(None, 32), {"name": augment})
    assert isinstance(transform.transforms[-1], ToNormalizedTensor)
    assert transform(Image.new("RGB", (40, 40))).shape == (3, 32, 32)


def test_loader_defaults_follow_the_machine() -> None:
    workers = resolve_num_workers("auto")
    assert workers == (0 if usable_cores() <= 2 else min(8, usable_cores() // 2))
    assert resolve_num_workers(3) == 3
    assert resolve_pin_memory("auto") == torch.cuda.is_available()
    assert resolve_pin_memory(True) is True


@pytest.mark.parametrize(
    ("name", "value"), [("num_workers", -1), ("num_workers", "many"), ("pin_memory", "yes")]
)
def test_bad_loader_options_are_user_errors(name: str, value) -> None:
    with pytest.raises(UserError, match=f"data.{name}="):
        TransferDataModule("digits", **{name: value})
