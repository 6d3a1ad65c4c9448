"""The feature cache trains the head exactly as the image path does, and only when valid."""

from __future__ import annotations

import functools

import pytest
import pytorch_lightning as pl
import torch

from transferlab.data import TransferDataModule
from transferlab.finetune import build_strategy
from transferlab.finetune.cache import FeatureCacheDataModule, cache_blocker
from transferlab.models import build_classifier, model_data_config
from transferlab.module import TransferModule

MODEL = {"name": "resnet18", "pretrained": False, "drop_rate": 0.3}


def digits(augment: str = "none") -> TransferDataModule:
    datamodule = TransferDataModule(
        "digits",
        samples_per_class=6,
        val_per_class=3,
        image_size=32,
        batch_size=8,
        seed=3,
        data_config=model_data_config(MODEL),
        augment={"name": augment},
    )
    datamodule.setup("fit")
    return datamodule


class InputShapes(pl.Callback):
    def __init__(self) -> None:
        self.ndims: dict[int, set[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.ndims.setdefault(trainer.current_epoch, set()).add(
            2 if "features" in batch else batch["image"].ndim
        )


def train(finetune: dict, cached: bool, epochs: int = 3, model: dict = MODEL, extra: tuple = ()):
    pl.seed_everything(0)
    images = digits()
    network = build_classifier(model, num_classes=images.num_classes)
    strategy = build_strategy(finetune)
    module = TransferModule(
        network,
        num_classes=images.num_classes,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        finetune=strategy,
    )
    shapes = InputShapes()
    data = FeatureCacheDataModule(images, strategy) if cached else images
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[strategy, shapes, *extra],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        reload_dataloaders_every_n_epochs=1 if cached else 0,
    )
    trainer.fit(module, datamodule=data)
    return network, shapes.ndims, trainer.callback_metrics


def test_cached_probe_matches_the_image_path():
    plain, plain_shapes, plain_metrics = train({"strategy": "linear_probe"}, cached=False)
    cached, cached_shapes, cached_metrics = train({"strategy": "linear_probe"}, cached=True)
    assert plain_shapes == {0: {4}, 1: {4}, 2: {4}}
    assert cached_shapes == {0: {2}, 1: {2}, 2: {2}}
    for (name, a), b in zip(
        plain.head.state_dict().items(), cached.head.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(
        torch.cat([p.flatten() for p in plain.backbone.parameters()]),
        torch.cat([p.flatten() for p in cached.backbone.parameters()]),
    )
    assert plain_metrics["val/acc"] == pytest.approx(float(cached_metrics["val/acc"]), abs=1e-6)


def test_lp_ft_uses_features_while_probing_then_images():
    _, shapes, _ = train({"strategy": "lp_ft", "probe_epochs": 2}, cached=True, epochs=4)
    assert shapes == {0: {2}, 1: {2}, 2: {4}, 3: {4}}


@pytest.mark.parametrize(
    ("finetune", "augment", "epochs", "reason"),
    [
        ({"strategy": "linear_probe"}, "none", 5, None),
        ({"strategy": "lp_ft"}, "none", 5, None),
        ({"strategy": "gradual"}, "none", 5, None),
        ({"strategy": "linear_probe"}, "basic", 5, "augment=basic"),
        ({"strategy": "full"}, "none", 5, "trains the backbone"),
        ({"strategy": "partial"}, "none", 5, "trains the backbone"),
        ({"strategy": "linear_probe", "feature_cache": False}, "none", 5, "feature_cache=false"),
        ({"strategy": "linear_probe"}, "none", 1, "single epoch"),
    ],
)
def test_cache_turns_itself_off_when_it_would_be_wrong(finetune, augment, epochs, reason):
    blocker = cache_blocker(build_strategy(finetune), augment, epochs)
    if reason is None:
        assert blocker is None
    else:
        assert reason in blocker


def test_lbfgs_probe_starts_from_the_logistic_regression_solution():
    from sklearn.linear_model import LogisticRegression

    class Capture(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            cached = trainer.datamodule.features("train")
            features, labels = cached.features, cached.labels
            with torch.no_grad():
                self.predicted = pl_module.network.head(features).argmax(1)
            self.features, self.labels = features, labels

    capture = Capture()
    pretrained = {"name": "tf_efficientnet_lite0", "pretrained": True, "weights": "package"}
    lbfgs = {"strategy": "linear_probe", "probe_solver": "lbfgs"}
    train(lbfgs, cached=True, epochs=1, model=pretrained, extra=(capture,))
    reference = LogisticRegression(C=1.0, tol=1e-10, max_iter=5000)
    reference.fit(capture.features.numpy(), capture.labels.numpy())
    expected = reference.predict(capture.features.numpy())
    assert len(set(expected)) == 10  # a real, non-degenerate solution
    assert (capture.predicted.numpy() == expected).mean() >= 0.98
