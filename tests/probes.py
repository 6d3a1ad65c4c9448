"""What each DDP rank of a real run saw and ended with, written by a callback added through
the run's config (``allowed_targets`` + PYTHONPATH): one JSON file per rank."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import pytorch_lightning as pl
import torch


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class RankProbe(pl.Callback):
    """Per rank: the training images of each epoch (digests), the epochs run, a digest of the
    weights at the end of fitting, the cached features' digest, the BatchNorm layer types,
    and whether the process had a logger or an active MLflow run."""

    def __init__(self) -> None:
        self.images: dict[int, list[str]] = {}
        self.record: dict[str, object] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if "image" in batch:
            seen = self.images.setdefault(trainer.current_epoch, [])
            seen.extend(digest(image) for image in batch["image"])

    def on_fit_end(self, trainer, pl_module) -> None:
        weights = torch.cat([p.detach().flatten().cpu() for p in pl_module.network.parameters()])
        cache = getattr(trainer.datamodule, "_features", {}).get("train")
        self.record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "epochs": trainer.current_epoch,
            "weights": digest(weights),
            "features": None if cache is None else digest(cache.features),
            "feature_labels": None if cache is None else cache.labels.tolist(),
            "norm_layers": sorted(
                {
                    type(m).__name__
                    for m in pl_module.network.modules()
                    if "Norm" in type(m).__name__
                }
            ),
            "logger": trainer.logger is not None,
            "mlflow_run": mlflow.active_run() is not None,
            "images": {str(epoch): seen for epoch, seen in self.images.items()},
        }
        folder = Path(trainer.default_root_dir)
        (folder / f"probe_rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
