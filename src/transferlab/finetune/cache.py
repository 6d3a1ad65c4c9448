"""Feature cache: while the whole backbone is frozen and the inputs do not change from epoch
to epoch, compute its features once and train the head on them."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from transferlab.data.samplers import epoch_loader, eval_loader
from transferlab.finetune.strategies import FinetuneStrategy
from transferlab.runtime import Runtime


def cache_blocker(strategy: FinetuneStrategy, augment_name: str, max_epochs: int) -> str | None:
    """Why the feature cache must stay off for this run, or None when it can be used."""
    if not strategy.feature_cache:
        return "finetune.feature_cache=false"
    if strategy.frozen_epochs() == 0:
        return f"finetune={strategy.name} trains the backbone from the first epoch"
    if augment_name != "none":
        return f"augment={augment_name} changes the images every epoch"
    if max_epochs == 1:
        return "a single epoch reads every image once anyway"
    return None


class FeatureSet(Dataset):
    """Cached backbone features and their labels; items are ``{features, label}`` batches,
    which the module sends through the head alone."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[index], "label": self.labels[index]}


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    desc: str,
    runtime: Runtime | None = None,
) -> FeatureSet:
    """The backbone's pooled features (eval mode) and the labels of every item of ``dataset``.

    ``runtime`` gives the memory format and inference precision (bf16 features are stored
    as fp32, so the head trains in fp32 either way). Under DDP each rank computes its
    block of the items and every rank gets them all (a collective).
    """
    from tqdm.auto import tqdm

    from transferlab.distributed import gather_rows

    runtime = runtime or Runtime()
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    loader = eval_loader(dataset, batch_size)
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        with runtime.inference(device.type):
            features.append(backbone(runtime.inputs(batch["image"].to(device))).float().cpu())
        labels.append(torch.as_tensor(batch["label"]))
    backbone.train(was_training)
    total = len(dataset)
    return FeatureSet(
        gather_rows(torch.cat(features), total, device),
        gather_rows(torch.cat(labels), total, device),
    )


class FeatureCacheDataModule(pl.LightningDataModule):
    """Wraps an image DataModule: cached features during the frozen epochs, images after.

    Loaders are built once and reused; both shuffle by (seed, epoch), so the head sees the
    same batches as it would from the image loader. The Trainer must
    reload dataloaders every epoch when the frozen phase ends before the run does.
    """

    def __init__(self, images: pl.LightningDataModule, strategy: FinetuneStrategy) -> None:
        super().__init__()
        self.images = images
        self.strategy = strategy
        self._loaders: dict[str, DataLoader] = {}
        self._features: dict[str, FeatureSet] = {}

    def setup(self, stage: str | None = None) -> None:
        self.images.setup(stage)

    def _frozen_now(self) -> bool:
        return self.trainer.current_epoch < self.strategy.frozen_epochs()

    def features(self, split: str) -> FeatureSet:
        """The backbone's features of ``split`` ("train" or "val"), computed once."""
        if split not in self._features:
            module = self.trainer.lightning_module
            self._features[split] = extract_features(
                module.network.backbone,
                {"train": self.images.train_set, "val": self.images.val_set}[split],
                self.images.eval_batch_size,
                module.device,
                desc=f"Caching {split} features",
                runtime=module.runtime,
            )
        return self._features[split]

    def _feature_loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        key = f"features/{split}"
        if key not in self._loaders:
            cached = self.features(split)
            self._loaders[key] = (
                epoch_loader(cached, batch_size, self.images.seed, self.images.start_epoch)
                if shuffle
                else eval_loader(cached, batch_size)
            )
        return self._loaders[key]

    def _images(self, split: str, make: Any) -> DataLoader:
        key = f"images/{split}"
        if key not in self._loaders:
            self._loaders[key] = make()
        return self._loaders[key]

    def train_dataloader(self) -> DataLoader:
        if self._frozen_now():
            return self._feature_loader("train", shuffle=True, batch_size=self.images.batch_size)
        return self._images("train", self.images.train_dataloader)

    def val_dataloader(self) -> DataLoader:
        if self._frozen_now():
            return self._feature_loader(
                "val", shuffle=False, batch_size=self.images.eval_batch_size
            )
        return self._images("val", self.images.val_dataloader)

    def test_dataloader(self) -> DataLoader:
        return self.images.test_dataloader()
