"""Embeddings judged on identities never seen in training: face recognition's recipe.

A pretrained backbone is fine-tuned into an embedding (``models.embedding``) with a margin
loss (ArcFace, CosFace, sub-center ArcFace), a triplet loss or a softmax baseline
(``task.loss``). The data are split by identity (``data.identities``), so validation and
test measure how well the embedding separates people it has never seen: verification of
pairs and retrieval (``tasks.embedding_metrics``), over each whole split. There is no
``val/loss``: the losses classify the training identities only. Test report: the ROC
curve with the operating point at ``task.far`` (its threshold chosen on validation, kept
for ``transferlab verify``), a 2-D map of the test embeddings and nearest-neighbour
examples.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torchmetrics import MetricCollection

from transferlab.errors import UserError
from transferlab.tasks.base import Step, Task, construct_datamodule, register_task
from transferlab.tasks.embedding_metrics import FARS, MAX_PAIRS

# Where a run keeps its verification threshold (output folder, and artifact root).
THRESHOLD_FILE = "verification.json"


@register_task("embedding")
class Embedding(Task):
    target = "label"
    supports_feature_cache = True
    compare_metrics = (
        "test/tar_at_far_1e-2",
        "test/map_at_r",
        "test/eer",
        "test/roc_auc",
        "test/precision_at_1",
        "test/verify_acc",
    )
    compare_figures = ("test/roc.png", "test/embeddings_2d.png")
    embeds = True

    def __init__(
        self,
        loss: str = "arcface",
        embedding_dim: int | None = 128,
        margin: float | None = None,
        scale: float | None = None,
        sub_centers: int | None = None,
        far: float = 1e-2,
        max_pairs: int = MAX_PAIRS,
    ) -> None:
        from transferlab.models.embedding import loss_options

        self.loss_options = {"margin": margin, "scale": scale, "sub_centers": sub_centers}
        loss_options(loss, self.loss_options)
        if embedding_dim is not None and not is_whole(embedding_dim, 1):
            raise UserError(
                f"task.embedding_dim={embedding_dim!r} must be a positive whole number, or null "
                "(the backbone's pooled features themselves)"
            )
        if not 0 < float(far) < 1:
            raise UserError(f"task.far={far!r} must be a false accept rate between 0 and 1")
        if not is_whole(max_pairs, 2):
            raise UserError(f"task.max_pairs={max_pairs!r} must be a whole number, 2 or more")
        self.loss, self.embedding_dim = loss, embedding_dim
        self.far, self.max_pairs = float(far), max_pairs

    def build_datamodule(self, cfg: Any):
        from transferlab.data.identity_datamodule import IdentityDataModule

        return construct_datamodule(IdentityDataModule, cfg)

    def build_network(self, model_cfg: Any, num_classes: int) -> nn.Module:
        from transferlab.models.embedding import build_embedder

        return build_embedder(
            model_cfg, num_classes, self.embedding_dim, self.loss, self.loss_options
        )

    def criterion(self, cfg: Any) -> None:
        """None: the loss is the head's own (``head.loss``), trained with it."""
        return None

    def metrics(self, num_classes: int) -> MetricCollection:
        from transferlab.tasks.embedding_metrics import EmbeddingScores

        fars = tuple(sorted({*FARS, self.far}))
        return MetricCollection({"scores": EmbeddingScores(fars, self.max_pairs)})

    def train_metrics(self, num_classes: int) -> MetricCollection | None:
        return None  # open-set metrics need all of a split's embeddings in eval mode

    def training_step(self, module: Any, batch: Mapping[str, Any]) -> Step:
        embeddings = module.outputs(batch)
        return Step(module.network.head.loss(embeddings, batch["label"]), None)

    def evaluation_step(self, module: Any, batch: Mapping[str, Any]) -> Step:
        return Step(None, module.infer(batch))

    def preprocessing(self, cfg: Any) -> tuple[Any, str, tuple[int, int, int]]:
        from transferlab.inference import classification_preprocessing

        return classification_preprocessing(cfg)

    def report(self, run, cfg: Any, module: Any, datamodule: Any) -> None:
        """The verification threshold at ``task.far`` chosen on validation (metrics and
        ``verification.json``), the test ROC curve with it marked, a 2-D map of the test
        embeddings and nearest-neighbour examples (PNG)."""
        import matplotlib.pyplot as plt

        from transferlab.reports import embedding as figures
        from transferlab.tasks.classification import validation_logits
        from transferlab.tasks.embedding_metrics import pair_scores, rates_at, tar_at_far

        val_scores, val_same = pair_scores(*validation_logits(module, datamodule), self.max_pairs)
        _, threshold = tar_at_far(val_scores, val_same, self.far)
        embeddings, labels = module.test_metrics["scores"].split()
        scores, same = pair_scores(embeddings, labels, self.max_pairs)
        test_far, test_tar = rates_at(scores, same, threshold)
        chosen = {"far": self.far, "threshold": threshold, "chosen_on": "val"}
        chosen |= {"test_far": test_far, "test_tar": test_tar}
        run.log_metrics(
            {
                "verify/threshold": threshold,
                "verify/test_far": test_far,
                "verify/test_tar": test_tar,
            }
        )
        text = json.dumps(chosen, indent=2) + "\n"
        (Path(cfg.paths.output_dir) / THRESHOLD_FILE).write_text(text)
        run.log_text(text, THRESHOLD_FILE)
        title = f"{cfg.model.name} + {self.loss}"
        names = list(datamodule.identity_names)
        for name, figure in (
            ("test/roc.png", figures.roc_figure(scores, same, chosen, f"{title}: test pairs")),
            (
                "test/embeddings_2d.png",
                figures.projection_figure(embeddings, labels, names, f"{title}: test embeddings"),
            ),
            (
                "test/neighbours.png",
                figures.neighbours_figure(
                    embeddings, labels, datamodule, names, f"{title}: test nearest neighbours"
                ),
            ),
        ):
            run.log_figure(figure, name)
            plt.close(figure)


def is_whole(value: Any, least: int) -> bool:
    """An integer (not a bool) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def verification_threshold(folder: Path) -> dict[str, Any]:
    """What a run chose for ``transferlab verify``: ``far``, ``threshold`` (cosine
    similarity) and the split it was chosen on."""
    path = folder / THRESHOLD_FILE
    if not path.is_file():
        raise UserError(
            f"{folder} has no {THRESHOLD_FILE}: the run did not finish its test report "
            "(tracking.enabled=false?); train it again with tracking on"
        )
    return json.loads(path.read_text())
