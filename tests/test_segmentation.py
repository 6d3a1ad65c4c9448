"""task=segmentation: the network, the loss and metrics, and runs through the real CLI."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from clitools import composed, sweep_runs
from hydra import compose, initialize_config_dir

from transferlab import CONF_DIR
from transferlab.build import build_parts
from transferlab.data.seg_datamodule import SegmentationDataModule
from transferlab.errors import UserError
from transferlab.models import build_classifier
from transferlab.models.segmentation import build_segmenter
from transferlab.tasks import build_task

BIN = Path(sys.executable).parent
LITE0 = {"name": "tf_efficientnet_lite0", "pretrained": True, "weights": "package"}
# A tiny segmentation run: 64 px scenes, a few batches of one epoch.
TINY = [
    "task=segmentation",
    "data.image_size=64",
    "data.train_images=16",
    "data.batch_size=8",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
]


def tiny_config(tmp_path: Path, *overrides: str):
    return composed(tmp_path, *TINY, *overrides)


def test_the_encoder_starts_from_the_packaged_imagenet_weights() -> None:
    segmenter = build_segmenter(LITE0, num_classes=11)
    classifier = build_classifier(LITE0, num_classes=10)
    reference = classifier.backbone.state_dict()
    encoder = segmenter.backbone.state_dict()
    assert len(encoder) > 250  # the head's conv is pruned; every feature layer is kept
    for name, tensor in encoder.items():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.parametrize("decoder", ["unet", "fpn", "deeplabv3plus"])
def test_every_decoder_predicts_a_class_per_pixel(decoder: str) -> None:
    network = build_segmenter({"name": "resnet18", "pretrained": False}, 4, decoder).eval()
    with torch.no_grad():
        assert network(torch.randn(2, 3, 64, 64)).shape == (2, 4, 64, 64)


def test_backbones_without_multiscale_features_are_refused_in_one_line() -> None:
    with pytest.raises(UserError, match="strides") as error:
        build_segmenter({"name": "vit_tiny_patch16_224", "pretrained": False}, 3)
    assert "\n" not in str(error.value)


def test_miou_matches_a_hand_computed_value() -> None:
    metrics = build_task({"name": "segmentation"}).metrics(3)
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 1]]])
    predicted = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 1]]])
    logits = torch.nn.functional.one_hot(predicted, 3).permute(0, 3, 1, 2).float()
    values = metrics(logits, target)
    # Labelled pixels only (the 255 one is ignored). IoU per class = TP / (TP + FP + FN):
    # class 0: TP 1, FP 1, FN 1 -> 1/3; class 1: TP 3, FP 1, FN 0 -> 3/4; class 2: 1/2.
    assert values["miou"].item() == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert values["pixel_acc"].item() == pytest.approx(5 / 7)


def test_scores_from_one_confusion_matrix_equal_torchmetrics_own_metrics() -> None:
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassF1Score,
        MulticlassJaccardIndex,
    )

    classes, ignore = 6, 255
    metrics = build_task({"name": "segmentation"}).metrics(classes).clone(prefix="val/")
    reference = {
        "val/miou": MulticlassJaccardIndex(classes, average="macro", ignore_index=ignore),
        "val/pixel_acc": MulticlassAccuracy(classes, average="micro", ignore_index=ignore),
        "val/dice": MulticlassF1Score(classes, average="macro", ignore_index=ignore),
    }
    per_class = MulticlassJaccardIndex(classes, average="none", ignore_index=ignore)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # accumulated over batches, as over a split
        logits = torch.randn(2, classes, 8, 8, generator=generator)
        logits[:, 5] -= 100  # class 5 is never predicted ...
        target = torch.randint(0, 4, (2, 8, 8), generator=generator)  # ... nor true; 4 only
        target[:, 0] = ignore  # predicted
        metrics.update(logits, target)
        per_class.update(logits, target)
        for metric in reference.values():
            metric.update(logits, target)
    values = metrics.compute()
    assert set(values) == set(reference)
    for name, metric in reference.items():
        assert values[name].item() == pytest.approx(metric.compute().item(), abs=1e-6), name
    scores = metrics["scores"]
    assert torch.allclose(scores.per_class_iou().float(), per_class.compute(), atol=1e-6)


def test_ignored_pixels_do_not_count_in_the_loss() -> None:
    criterion = build_task({"name": "segmentation", "loss": "ce+dice"}).criterion(None)
    logits = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.randint(0, 3, (1, 4, 4), generator=torch.Generator().manual_seed(1))
    ignored = mask.clone()
    ignored[0, 0] = 255
    changed = logits.clone()
    changed[0, :, 0] = torch.randn(3, 4)  # only where the mask is ignored
    assert criterion(logits, ignored) == pytest.approx(criterion(changed, ignored).item())
    assert criterion(logits, mask) != pytest.approx(criterion(changed, mask).item())


def test_unknown_decoder_and_loss_are_user_errors() -> None:
    with pytest.raises(UserError, match=r"task\.decoder"):
        build_task({"name": "segmentation", "decoder": "segformer"})
    with pytest.raises(UserError, match=r"task\.loss"):
        build_task({"name": "segmentation", "loss": "focal"})
    with pytest.raises(UserError, match="unknown task"):
        build_task({"name": "keypoints"})


def test_a_linear_probe_leaves_the_encoder_bit_identical(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    cfg = tiny_config(tmp_path, "finetune=linear_probe")
    parts = build_parts(cfg)
    assert parts.fit_data is parts.datamodule  # no feature cache for a decoder
    before = {k: v.clone() for k, v in parts.network.backbone.state_dict().items()}
    head_before = {k: v.clone() for k, v in parts.network.head.state_dict().items()}
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[parts.strategy],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(parts.module, datamodule=parts.datamodule)
    after = parts.network.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics included
    head_after = parts.network.head.state_dict()
    assert any(not torch.equal(head_before[k], head_after[k]) for k in head_before)


def test_segmentation_data_refuses_classification_sources() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=["task=segmentation", "data=digits"])
    with pytest.raises(UserError, match="not a segmentation source"):
        build_parts(cfg)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"augment": {"name": "randaugment"}},
            "augment=randaugment is not available for segmentation",
        ),
        ({"val_fraction": 0.0}, "data.val_fraction=0.0 must be between 0 and 1"),
        ({"val_fraction": 0.6, "test_fraction": 0.4}, "leave no training images"),
    ],
)
def test_segmentation_datamodule_rejects_bad_keys(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        SegmentationDataModule("fmnist_scenes", batch_size=2, **kwargs)


def transferlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "transferlab"), *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def test_cli_run_records_miou_and_the_report(tmp_path: Path) -> None:
    suite = ["shift=corruptions", "shift.corruptions=[contrast,rotate]", "shift.severities=[2]"]
    result = transferlab(
        "train", *TINY, *suite, "shift.limit=8", f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Feature cache" not in result.stdout  # full fine-tuning: nothing to cache
    assert "rotate left out" in result.stdout  # it would move pixels off their labels
    run_id = re.search(r"MLflow run: (\w+)", result.stdout).group(1)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(run_id)
    metrics, tags = run.data.metrics, run.data.tags
    assert {"test/miou", "test/dice", "test/pixel_acc", "best/val/miou"} <= set(metrics)
    assert 0.0 <= metrics["test/miou"] <= 1.0
    assert tags["task"] == "segmentation" and tags["task.compare_metrics"].startswith("test/miou")
    assert run.data.params["task.decoder"] == "unet"
    files = {Path(a.path).name for a in client.list_artifacts(run_id, "test")}
    assert {"per_class_iou.csv", "predictions.png", "gradcam.png"} <= files
    history = client.get_metric_history(run_id, "shift/contrast/miou")
    assert [m.step for m in history] == [2]  # charted against severity
    assert "shift/mean/miou" in metrics and "shift/rotate/miou" not in metrics
    local = Path(client.download_artifacts(run_id, "test/per_class_iou.csv", str(tmp_path)))
    rows = local.read_text().splitlines()
    assert rows[0] == "class,iou" and rows[1].startswith("background,") and len(rows) == 12


@pytest.mark.slow  # 25 s on 2 cores; the classification sweep covers sweeps by default
def test_a_sweep_of_decoders_and_strategies_compares_miou(tmp_path: Path) -> None:
    result = transferlab(
        "train", "-m", *TINY, "task.decoder=unet,fpn", "finetune=linear_probe,full",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 4
    assert {run.info.status for run in children} == {"FINISHED"}
    jobs = {(r.data.params["task.decoder"], r.data.params["finetune.strategy"]) for r in children}
    assert jobs == {(d, f) for d in ("unet", "fpn") for f in ("linear_probe", "full")}
    table = (tmp_path / "sweep" / "comparison.md").read_text()
    header = table.splitlines()[0]
    assert "best val/miou" in header and "test/miou" in header and "test/acc" not in header
    compared = transferlab("compare", str(tmp_path / "sweep"), cwd=tmp_path)
    assert compared.returncode == 0 and "test/miou" in compared.stdout
    for child in children:
        assert math.isfinite(child.data.metrics["test/miou"])


def test_bn_eval_keeps_the_encoders_statistics_and_the_decoder_learns_its_own(
    tmp_path: Path,
) -> None:
    import pytorch_lightning as pl

    cfg = tiny_config(tmp_path, "finetune=full", "finetune.bn=eval")
    parts = build_parts(cfg)

    def running_means(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in module.state_dict().items() if "running_mean" in k}

    encoder, decoder = running_means(parts.network.backbone), running_means(parts.network.head)
    assert encoder and decoder
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[parts.strategy],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(parts.module, datamodule=parts.datamodule)
    after_encoder = running_means(parts.network.backbone)
    after_decoder = running_means(parts.network.head)
    assert all(torch.equal(encoder[k], after_encoder[k]) for k in encoder)
    assert all(not torch.equal(decoder[k], after_decoder[k]) for k in decoder)


def test_fast_metric_updates_in_deterministic_runs_give_the_same_values() -> None:
    from transferlab.module import metric_updates

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 16, 16, generator=generator)
    mask = torch.randint(0, 5, (2, 16, 16), generator=generator)
    task = build_task({"name": "segmentation"})
    slow, fast = task.metrics(5), task.metrics(5)
    torch.use_deterministic_algorithms(True)
    try:
        slow.update(logits, mask)  # torchmetrics' deterministic bincount
        with metric_updates(logits.device):
            assert not torch.are_deterministic_algorithms_enabled()
            fast.update(logits, mask)
        assert torch.are_deterministic_algorithms_enabled()  # restored
    finally:
        torch.use_deterministic_algorithms(False)
    for name, value in slow.compute().items():
        assert torch.equal(value, fast.compute()[name]), name


def test_a_shifted_segmentation_test_set_corrupts_images_and_keeps_masks(tmp_path: Path) -> None:
    from transferlab.build import build_datamodule

    cfg = tiny_config(tmp_path)
    datamodule = build_datamodule(cfg)
    task = build_task({"name": "segmentation"})
    shifted = task.shifted_test_set(datamodule, "gaussian_noise", 5, seed=0)
    clean, noisy = datamodule.test_set[0], shifted[0]
    assert torch.equal(clean["mask"], noisy["mask"])
    assert clean["image"].shape == noisy["image"].shape
    assert (clean["image"] - noisy["image"]).abs().mean() > 0.1
    assert torch.equal(noisy["image"], shifted[0]["image"])  # the same pixels every time
    with pytest.raises(UserError, match="moves pixels"):
        task.shifted_test_set(datamodule, "rotate", 1, seed=0)
