"""Grad-CAM: the training report's `test/gradcam.png`, `transferlab explain` through the real
CLI, and the heat maps themselves (layer choice, shape, gradients, where they point)."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from clitools import error_line, transferlab
from PIL import Image
from test_inference import digit_images
from torch import nn

from transferlab.models import build_classifier
from transferlab.reports.gradcam import heat_maps


def test_training_run_logs_gradcam_grid(trained_run, tmp_path: Path) -> None:
    cwd, _, run_id = trained_run
    client = mlflow.MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    assert "test/gradcam.png" in {a.path for a in client.list_artifacts(run_id, "test")}
    local = client.download_artifacts(run_id, "test/gradcam.png", str(tmp_path))
    with Image.open(local) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 200


def test_explain_folder_writes_overlays_and_skips_corrupt(trained_run, tmp_path: Path) -> None:
    cwd, _, run_id = trained_run
    images = tmp_path / "images"
    digit_images(images, 3)
    (images / "sub").mkdir()
    shutil.copy(images / "digit0.png", images / "sub" / "digit0.png")  # the same stem twice
    out = tmp_path / "explain"
    result = transferlab("explain", f"run={run_id}", f"images={images}", f"out={out}", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Grad-CAM heat maps of 4 image(s)" in result.stdout
    assert "skipped 1 unreadable file(s)" in result.stdout
    assert "corrupt.png" in result.stderr
    names = {"digit0", "digit1", "digit2", "sub__digit0"}
    assert {p.name for p in out.iterdir()} == {f"{n}_gradcam.png" for n in names} | {"gradcam.png"}
    for path in out.iterdir():
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    from transferlab.cli import main

    before = (out / "digit1_gradcam.png").stat().st_mtime_ns
    # A class of the run's instead of the predicted one, into the existing folder.
    assert main(["explain", f"run={cwd / 'outputs' / 'run'}", f"images={images / 'digit1.png'}",
                 f"out={out}", "class=7"]) == 0  # fmt: skip
    assert (out / "digit1_gradcam.png").stat().st_mtime_ns > before
    assert len(list(out.iterdir())) == 5


@pytest.mark.parametrize(
    ("images", "run", "message"),
    [
        ("images", "0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
        ("empty", None, "has no images"),
    ],
)
def test_explain_bad_input_is_one_line_and_writes_nothing(
    trained_run, tmp_path: Path, images: str, run: str | None, message: str
) -> None:
    cwd, folder, _ = trained_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    digit_images(tmp_path / "images", 1)
    out = tmp_path / "deep" / "explain"
    result = transferlab(
        "explain", f"run={run or folder}", f"images={tmp_path / images}", f"out={out}", cwd=cwd
    )
    assert message in error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "images"]


def test_explain_unknown_class_is_one_line_and_writes_nothing(
    trained_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transferlab.cli import main

    _, folder, _ = trained_run
    digit_images(tmp_path / "images", 1)
    out = tmp_path / "explain"
    assert main(["explain", f"run={folder}", f"images={tmp_path / 'images'}", f"out={out}",
                 "class=eleven"]) == 1  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("transferlab: error: class=eleven is not")
    assert "one of 0, 1, 2" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def small_network(name: str, **kwargs: object) -> nn.Module:
    return build_classifier({"name": name, "pretrained": False, "kwargs": kwargs}, num_classes=4)


@pytest.mark.parametrize(
    ("name", "kwargs", "layer"),
    [
        ("resnet18", {}, "backbone.layer3"),  # 64 px: layer4's map would be 2x2
        ("vit_tiny_patch16_224", {"dynamic_img_size": True}, "backbone.blocks.11.norm1"),
    ],
)
def test_heat_maps_fit_the_input_and_leave_the_network_as_it_was(
    name: str, kwargs: dict, layer: str
) -> None:
    torch.manual_seed(0)
    network = small_network(name, **kwargs)
    network.backbone.requires_grad_(False)  # a frozen backbone: no gradient reaches it
    network.head.eval()
    flags = [p.requires_grad for p in network.parameters()]
    modes = [m.training for m in network.modules()]
    images = torch.randn(3, 3, 64, 80)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # as eval runs
        maps = heat_maps(network, images.clone(), [None, 2, None])
    assert maps.layer == layer
    assert maps.maps.shape == (3, 64, 80) and maps.maps.dtype == np.float32
    assert maps.maps.min() >= 0.0 and maps.maps.max() <= 1.0
    assert all(heat.std() > 0.01 for heat in maps.maps)  # not constant
    assert maps.outputs.dtype == torch.float32 and maps.outputs.shape == (3, 4)
    assert maps.classes[1] == 2 and maps.classes[0] == int(maps.outputs[0].argmax())
    assert [p.requires_grad for p in network.parameters()] == flags
    assert [m.training for m in network.modules()] == modes
    assert all(p.grad is None for p in network.parameters())


class Regions(nn.Module):
    """Two channels: the image inside ``region`` and the image outside it."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("region", region.float())
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.cat([x * self.region, x * (1 - self.region)], dim=1)


class RegionBackbone(nn.Module):
    feature_info = [{"module": "stage", "num_chs": 2, "reduction": 1}]

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.stage = Regions(region)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage(x)


class RegionClassifier(nn.Module):
    """Class 0 is the mean brightness inside a region, class 1 outside it."""

    def __init__(self, region: torch.Tensor) -> None:
        super().__init__()
        self.backbone = RegionBackbone(region)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def test_heat_map_points_at_the_region_the_class_depends_on() -> None:
    region = torch.zeros(12, 20, dtype=torch.bool)
    region[:5, 13:] = True  # top right of a wide image: a transposed map would miss it
    network = RegionClassifier(region)
    images = torch.rand(2, 1, 12, 20, generator=torch.Generator().manual_seed(0)) + 0.1
    inside, outside = heat_maps(network, images, [0, 1]).maps
    assert inside[region.numpy()].mean() > 0.3 > 10 * inside[~region.numpy()].mean()
    assert outside[~region.numpy()].mean() > 0.3 > 10 * outside[region.numpy()].mean()


def test_overlay_names_are_distinct() -> None:
    from transferlab.explain import overlay_names

    root = Path("/data")
    files = [
        root / "a" / "cat.jpg",
        root / "b" / "Cat.png",
        root / "dog.png",
        root / "b" / "cat.jpg",
    ]
    files.append(root / "b" / "cat.png")
    assert overlay_names(files, root) == [
        "a__cat_gradcam.png",
        "b__Cat_png_gradcam.png",
        "dog_gradcam.png",
        "b__cat_jpg_gradcam.png",
        "b__cat_png-2_gradcam.png",
    ]


def segmentation_run(folder: Path, classes: tuple[str, ...]) -> Path:
    """A segmentation run folder as training leaves it (its saved config and a best
    checkpoint), the network at random initialisation: explain needs no training."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from transferlab import CONF_DIR
    from transferlab.inference import build_network

    overrides = ["task=segmentation", "data.image_size=64", "model.pretrained=false"]
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=overrides)
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    network, _ = build_network(cfg, len(classes))
    state = {f"network.{k}": v for k, v in network.state_dict().items()}
    (folder / "checkpoints").mkdir()
    checkpoint = {"state_dict": state, "hyper_parameters": {"class_names": list(classes)}}
    torch.save(checkpoint, folder / "checkpoints" / "best-epoch00.ckpt")
    return folder


def test_explain_a_segmentation_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transferlab.cli import main

    torch.manual_seed(0)
    classes = ("background", "circle", "square", "line")
    run = segmentation_run(tmp_path / "run", classes)
    digit_images(tmp_path / "images", 2)
    out = tmp_path / "explain"
    assert main(["explain", f"run={run}", f"images={tmp_path / 'images'}", f"out={out}"]) == 0
    assert "Grad-CAM heat maps of 2 image(s)" in capsys.readouterr().out
    written = {"digit0_gradcam.png", "digit1_gradcam.png", "gradcam.png"}
    assert {p.name for p in out.iterdir()} == written
    assert main(["explain", f"run={run}", f"images={tmp_path / 'images'}", f"out={out}",
                 "class=square"]) == 0  # fmt: skip
    assert main(["explain", f"run={run}", f"images={tmp_path / 'images'}", f"out={out}",
                 "class=triangle"]) == 1  # fmt: skip
    assert "class=triangle is not a class of this run" in capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == written


def test_segmentation_heat_maps_explain_a_class_over_its_predicted_pixels() -> None:
    from transferlab.models.segmentation import build_segmenter
    from transferlab.reports.gradcam import most_frequent_class

    torch.manual_seed(0)
    network = build_segmenter({"name": "resnet18", "pretrained": False}, 4)
    maps = heat_maps(network, torch.randn(2, 3, 64, 64), [None, 2])
    assert maps.maps.shape == (2, 64, 64) and maps.outputs.shape == (2, 4, 64, 64)
    assert maps.classes == [most_frequent_class(maps.outputs[0].argmax(0), 4), 2]
    assert maps.classes[0] != 0 and maps.maps[0].std() > 0.01
    labels = torch.tensor([[0, 0, 3], [255, 255, 255], [1, 3, 0]])
    assert most_frequent_class(labels, 4) == 3
    assert most_frequent_class(torch.zeros(4, 4, dtype=torch.long), 4) == 0
