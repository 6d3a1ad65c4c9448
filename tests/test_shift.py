"""The corruption suite (transferlab.shift): shapes, determinism, severity, where it goes."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from transferlab.data.transforms import (
    ToNormalizedTensor,
    create_eval_transform,
    resolve_data_config,
)
from transferlab.errors import UserError
from transferlab.shift import (
    CORRUPTION_FUNCTIONS,
    CORRUPTIONS,
    SEVERITIES,
    Corruption,
    check_corruptions,
    check_severities,
    with_corruption,
)

REQUIRED = (
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
EXTRAS = sorted(set(CORRUPTION_FUNCTIONS) - set(CORRUPTIONS))
# The ones that draw random numbers: a new seed gives new pixels.
RANDOM = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "motion_blur",
    "elastic_transform",
    "rotate",
)
SIZES = ((32, 32), (64, 64), (100, 75), (75, 100))  # (width, height) as PIL takes them
NATURAL = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")


def natural(name: str, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A scikit-image sample photo as an RGB image of ``size`` (width, height)."""
    return Image.fromarray(getattr(skimage_data, name)()).convert("RGB").resize(size)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def change(clean: Image.Image, corrupted: Image.Image) -> float:
    return float(np.abs(pixels(corrupted) - pixels(clean)).mean())


def test_the_default_suite_holds_the_named_corruptions_in_order() -> None:
    assert CORRUPTIONS[: len(REQUIRED)] == REQUIRED
    assert set(CORRUPTIONS) <= set(CORRUPTION_FUNCTIONS)
    assert "glass_blur" not in CORRUPTIONS


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_keeps_size_mode_and_dtype(name: str) -> None:
    for size in (*SIZES, (512, 384)):
        for mode in ("RGB", "L"):
            clean = natural("chelsea", size).convert(mode)
            for severity in (1, 5):
                corrupted = Corruption(name, severity, seed=0)(clean)
                assert (corrupted.mode, corrupted.size) == (mode, size), (severity, size, mode)
                assert np.asarray(corrupted).dtype == np.uint8
                assert change(clean, corrupted) > 0, (severity, size, mode)


@pytest.mark.parametrize("name", EXTRAS)
def test_the_extra_corruptions_work_at_small_sizes(name: str) -> None:
    for size in ((32, 32), (75, 100)):
        clean = natural("coffee", size)
        corrupted = Corruption(name, 5, seed=0)(clean)
        assert (corrupted.mode, corrupted.size) == ("RGB", size)
        assert np.asarray(corrupted).dtype == np.uint8


def test_a_gray_image_is_corrupted_as_its_rgb_copy() -> None:
    gray = natural("camera").convert("L")
    for name in RANDOM:
        as_rgb = Corruption(name, 3, seed=1)(gray.convert("RGB")).convert("L")
        assert np.array_equal(np.asarray(Corruption(name, 3, seed=1)(gray)), np.asarray(as_rgb))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_the_same_seed_gives_the_same_pixels_in_any_order(name: str) -> None:
    images = [natural(n) for n in NATURAL[:3]]
    np.random.seed(1)  # whatever the global state was before
    forward = [pixels(Corruption(name, 3, seed=7)(image)) for image in images]
    np.random.seed(2)
    backward = [pixels(Corruption(name, 3, seed=7)(image)) for image in reversed(images)]
    for a, b in zip(forward, reversed(backward), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", RANDOM)
def test_another_seed_gives_other_pixels(name: str) -> None:
    image = natural("astronaut")
    first = pixels(Corruption(name, 3, seed=0)(image))
    assert not np.array_equal(first, pixels(Corruption(name, 3, seed=1)(image)))


class Images(Dataset):
    def __init__(self, images: list[Image.Image], transform: Corruption) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(pixels(self.transform(self.images[index])))


def test_loader_processes_give_the_pixels_of_the_main_process() -> None:
    images = [natural(n) for n in NATURAL]
    corruption = pickle.loads(pickle.dumps(Corruption("gaussian_noise", 4, seed=3)))
    here = [pixels(Corruption("gaussian_noise", 4, seed=3)(image)) for image in images]
    loader = DataLoader(Images(images[::-1], corruption), batch_size=None, num_workers=2)
    for index, batch in enumerate(loader):
        assert np.array_equal(batch.numpy(), here[len(images) - 1 - index])


def test_numpy_global_random_state_is_left_as_it_was() -> None:
    image = natural("rocket")
    np.random.seed(123)
    np.random.standard_normal()  # a cached second normal is part of the state too
    before = np.random.get_state()
    for name in CORRUPTIONS:
        Corruption(name, 5, seed=0)(image)
    after = np.random.get_state()
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    assert after[2:] == before[2:]


@pytest.mark.parametrize("size", [(64, 64), (32, 32)])
def test_severity_changes_natural_images_more_on_average(size: tuple[int, int]) -> None:
    """Mean absolute pixel change from the clean image over six photos and four seeds.

    Four seeds, not one: motion_blur draws its angle per image, and with one seed the angle
    decides more than severities 4 -> 5 (radius 15 -> 20) do on six images.
    """
    images = [natural(name, size) for name in NATURAL]
    for name in CORRUPTIONS:
        means = [
            np.mean(
                [
                    change(image, Corruption(name, severity, seed)(image))
                    for image in images
                    for seed in range(4)
                ]
            )
            for severity in SEVERITIES
        ]
        assert all(b > a for a, b in itertools.pairwise(means)), (name, np.round(means, 2))


def eval_transform() -> T.Compose:
    return create_eval_transform(resolve_data_config(None, 64))


def test_with_corruption_inserts_the_corruption_before_normalisation() -> None:
    transform = eval_transform()
    shifted = with_corruption(transform, "contrast", 5, seed=0)
    steps = shifted.transforms
    assert isinstance(steps[-1], ToNormalizedTensor)
    assert isinstance(steps[-2], Corruption) and steps[-2].name == "contrast"
    assert steps[:-2] == transform.transforms[:-1]
    assert not any(isinstance(step, Corruption) for step in transform.transforms)

    image = natural("coffee", (120, 90))
    resized = T.Compose(transform.transforms[:-1])(image)
    by_hand = transform.transforms[-1](Corruption("contrast", 5, seed=0)(resized))
    assert torch.equal(shifted(image), by_hand)
    assert not torch.equal(shifted(image), transform(image))


def test_with_corruption_refuses_a_transform_without_a_tensor_step() -> None:
    with pytest.raises(TypeError, match="Compose"):
        with_corruption(lambda image: image, "contrast", 1, seed=0)
    with pytest.raises(TypeError, match="to-tensor"):
        with_corruption(T.Compose([T.CenterCrop(32)]), "contrast", 1, seed=0)


def one_line_error(call, *args) -> str:
    with pytest.raises(UserError) as raised:
        call(*args)
    message = str(raised.value)
    assert "\n" not in message, message
    return message


def test_unknown_corruption_is_one_line_listing_the_known_ones() -> None:
    message = one_line_error(check_corruptions, ["contrast", "fog_of_war"])
    assert "fog_of_war" in message and all(name in message for name in CORRUPTION_FUNCTIONS)
    assert "fog_of_war" in one_line_error(Corruption, "fog_of_war", 1, 0)


@pytest.mark.parametrize("severity", [0, 6, "x", -1, 2.5])
def test_a_severity_outside_1_to_5_is_one_line(severity) -> None:
    assert "severit" in one_line_error(check_severities, [1, severity])
    assert "severit" in one_line_error(Corruption, "contrast", severity, 0)


def test_names_and_severities_are_checked_and_kept_in_order() -> None:
    assert check_corruptions(["rotate", "contrast", "rotate"]) == ["rotate", "contrast"]
    assert check_severities(["5", 1, 5]) == [5, 1]


def test_an_image_under_32_pixels_is_one_line_naming_the_setting() -> None:
    image = Image.new("RGB", (28, 28))
    assert "data.image_size" in one_line_error(Corruption("contrast", 1, 0), image)
