"""task=embedding: the open-set identity split, the metrics against hand computations, the
margin losses' class centres in the head's optimizer group, and runs, sweeps, bad inputs
and the embed/verify commands through the real CLI."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from clitools import composed, error_line, sweep_runs, train_in, transferlab
from PIL import Image

from transferlab.build import build_datamodule, build_parts
from transferlab.data.identities import split_identities
from transferlab.data.identity_datamodule import IdentityDataModule
from transferlab.errors import UserError
from transferlab.tasks import build_task
from transferlab.tasks.embedding_metrics import (
    kfold_accuracy,
    pair_indices,
    retrieval,
    tar_at_far,
    verification,
)

# A tiny real run: 20 images of each of the 10 stand-in identities at 32 px, a few batches.
TINY = [
    "task=embedding",
    "data.images_per_identity=20",
    "data.image_size=32",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "callbacks.progress_bar.refresh_rate=0",
]


def tensors(positives: list[float], negatives: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.tensor([*positives, *negatives], dtype=torch.float64)
    same = torch.tensor([True] * len(positives) + [False] * len(negatives))
    return scores, same


# ----------------------------------------------------------------------------- metrics


def numpy_tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """The best TAR over every threshold (a pair is accepted at >= it) whose FAR <= far."""
    best = 0.0
    for threshold in np.unique(scores):
        accepted = scores >= threshold
        if accepted[~same].mean() <= far:
            best = max(best, accepted[same].mean())
    return best


def test_tar_at_far_and_eer_match_hand_computed_values() -> None:
    # 100 impostor scores from -0.5 to 0.5: at FAR 1e-2 only the highest (0.5) may pass,
    # so the genuine pairs accepted are those above it, 4 of 5; the threshold reported is
    # the highest with that TAR, the lowest of those 4 genuine scores.
    scores, same = tensors([0.9, 0.8, 0.7, 0.6, 0.3], np.linspace(-0.5, 0.5, 100).tolist())
    tar, threshold = tar_at_far(scores, same, 1e-2)
    assert tar == pytest.approx(0.8)
    assert threshold == pytest.approx(0.6)
    # At threshold 0.7 one impostor of four (0.85) is accepted and one genuine pair of four
    # (0.2) rejected: FAR = FRR = 0.25, the equal error rate.
    values = verification(*tensors([0.9, 0.8, 0.7, 0.2], [0.1, 0.3, 0.4, 0.85]))
    assert values["eer"] == pytest.approx(0.25)
    assert values["roc_auc"] == pytest.approx(11 / 16)  # genuine above impostor: 11 of 16


def test_tar_at_far_matches_numpy_on_random_scores() -> None:
    generator = np.random.default_rng(0)
    scores = np.concatenate([generator.normal(0.5, 0.2, 300), generator.normal(0, 0.2, 3000)])
    same = np.arange(len(scores)) < 300
    for far in (1e-3, 1e-2, 0.1):
        tar, _ = tar_at_far(torch.tensor(scores.clip(-1, 1)), torch.tensor(same), far)
        assert tar == pytest.approx(numpy_tar_at_far(scores.clip(-1, 1), same, far)), far


def test_ten_fold_accuracy_on_a_tiny_list() -> None:
    # Ten pairs, ten folds: each pair is classified at the best threshold of the other nine
    # (halfway between two neighbouring scores). Only the impostor at 0.95 is wrong: without
    # it the threshold is 0.575, which accepts it. Held out, the genuine 0.65 still passes
    # (threshold 0.6), and the impostor 0.5 is still rejected (0.525).
    scores, same = tensors([0.9, 0.8, 0.7, 0.65], [0.1, 0.2, 0.3, 0.4, 0.5, 0.95])
    assert kfold_accuracy(scores, same, folds=10) == pytest.approx(0.9)
    assert verification(scores, same)["verify_acc"] == pytest.approx(0.9)


def test_map_at_r_and_precision_at_1_match_a_hand_computation() -> None:
    # Two identities on a circle (degrees): A at 0, 5, 30; B at 20, 65, 75. R = 2 for each
    # query; its ranked neighbours give AP@R: A0 [A5, B20] 1/2, A5 [A0, B20] 1/2,
    # A30 [B20, A5] 1/4, B20 [A30, A5] 0, B65 [B75, A30] 1/2, B75 [B65, A30] 1/2.
    angles = torch.tensor([0.0, 5.0, 30.0, 20.0, 65.0, 75.0]).deg2rad()
    embeddings = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    values = retrieval(embeddings, labels)
    assert values["map_at_r"] == pytest.approx(2.25 / 6)
    assert values["precision_at_1"] == pytest.approx(4 / 6)


def test_the_metric_accumulates_a_whole_split() -> None:
    metric = build_task({"name": "embedding"}).metrics(7)
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    labels = torch.arange(40) % 4
    embeddings = centres[labels] + 0.1 * torch.randn(40, 16, generator=generator)
    for part in range(4):  # batches
        metric.update(embeddings[part * 10 : (part + 1) * 10], labels[part * 10 : (part + 1) * 10])
    values = {key: float(value) for key, value in metric.compute().items()}
    assert values["precision_at_1"] == 1.0 and values["map_at_r"] == 1.0
    assert values["roc_auc"] == 1.0 and values["eer"] == 0.0
    assert set(values) >= {"tar_at_far_1e-3", "tar_at_far_1e-2", "verify_acc"}


def test_pairs_are_all_pairs_or_a_seeded_sample_with_every_positive() -> None:
    labels = torch.arange(30) % 3
    first, second = pair_indices(labels, max_pairs=1000)
    assert len(first) == 30 * 29 // 2 and bool((first < second).all())
    first, second = pair_indices(labels, max_pairs=200)
    assert len(first) == 200 and bool((first < second).all())
    positives = int((labels[first] == labels[second]).sum())
    assert positives == 100  # half the sample: 3 * C(10, 2) = 135 positives, sampled down
    again = pair_indices(labels, max_pairs=200)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])


# ----------------------------------------------------------------------------- identity split


def test_no_test_or_validation_identity_is_trained_on(tmp_path: Path) -> None:
    datamodule = build_datamodule(composed(tmp_path, *TINY))
    names = datamodule.identity_names

    def identities(dataset) -> set[str]:
        return {names[label] for label in dataset.labels.tolist()}

    train, val, test = (identities(s) for s in (datamodule.train_set, datamodule.val_set,
                                                 datamodule.test_set))  # fmt: skip
    assert len(train) == 7 and len(test) == 3 and val == test  # the default: halves of test's
    assert not train & test
    assert set(datamodule.class_names) == train and datamodule.num_classes == 7
    assert not set(datamodule.val_set.indices) & set(datamodule.test_set.indices)
    assert len(datamodule.train_set) == 140 and len(datamodule.test_set) == 30


def write_identities(root: Path, counts: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
                root / name / f"{i}.jpg"
            )


def test_an_identity_folder_holds_out_disjoint_identities(tmp_path: Path, capsys) -> None:
    write_identities(tmp_path, {f"person{i:02d}": 3 + i % 3 for i in range(12)} | {"solo": 1})
    datamodule = IdentityDataModule(
        "identity_folder", root=str(tmp_path), val_identities=3, test_identities=0.25,
        image_size=32,
    )  # fmt: skip
    datamodule.setup()
    names = datamodule.identity_names
    splits = [
        {names[label] for label in dataset.labels.tolist()}
        for dataset in (datamodule.train_set, datamodule.val_set, datamodule.test_set)
    ]
    assert [len(s) for s in splits] == [6, 3, 3]
    assert len(set.union(*splits)) == 12  # disjoint
    assert "solo" not in names  # one image: no positive pair
    assert "Left out 1 of 13 identities with fewer than 2 images" in capsys.readouterr().out
    again = IdentityDataModule("identity_folder", root=str(tmp_path), val_identities=3,
                               test_identities=0.25, image_size=32, seed=1)  # fmt: skip
    again.setup()
    assert {again.identity_names[label] for label in again.test_set.labels.tolist()} == splits[2]


def test_split_errors_say_what_to_change() -> None:
    labels = np.repeat(np.arange(5), 3)
    names = tuple(f"p{i}" for i in range(5))
    options = {"seed": 0, "min_images": 2, "images_per_identity": None, "where": "here"}
    with pytest.raises(UserError, match=r"here has 5 identities .* the split needs 6"):
        split_identities(labels, names, val_identities=2, test_identities=2, **options)
    with pytest.raises(UserError, match="none of the 5 identities in here has"):
        split_identities(labels, names, val_identities=None, test_identities=2,
                         **{**options, "min_images": 4})  # fmt: skip


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("loss", ["arcface", "cosface", "subcenter_arcface", "softmax"])
def test_the_class_centres_train_in_the_heads_group_at_the_heads_rate(
    tmp_path: Path, loss: str
) -> None:
    cfg = composed(tmp_path, *TINY, f"task.loss={loss}", "scheduler=none", "model.pretrained=false")
    parts = build_parts(cfg)
    centres = [p for p in parts.network.head.loss.parameters()]
    assert centres  # the loss owns parameters
    optimizer = parts.module.configure_optimizers()
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    lr = cfg.optimizer.lr
    for param in centres:
        assert groups[id(param)]["name"].startswith("head")
        assert groups[id(param)]["lr"] == pytest.approx(lr)
    backbone = [g for g in optimizer.param_groups if g["name"].startswith("backbone")]
    assert backbone and all(g["lr"] == pytest.approx(lr * 0.3) for g in backbone)
    before = [p.detach().clone() for p in centres]
    batch = next(iter(parts.datamodule.train_dataloader()))
    parts.network.train()
    optimizer.zero_grad()
    parts.task.training_step(parts.module, batch).loss.backward()
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, centres, strict=True))


def test_a_null_embedding_dim_embeds_the_backbones_pooled_features(tmp_path: Path) -> None:
    """The untrained baseline of the README: no projection, no neck."""
    cfg = composed(tmp_path, *TINY, "task.embedding_dim=null", "model.pretrained=false")
    task = build_task({"name": "embedding", "embedding_dim": None})
    network = task.build_network(cfg.model, 7).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(network.backbone(images), dim=1)
        assert torch.allclose(network(images), expected, atol=1e-6)


def test_the_corruption_suite_is_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"shift=corruptions supports task=classification.*"
                       r"this run is a task=embedding run"):  # fmt: skip
        build_parts(composed(tmp_path, *TINY, "shift=corruptions"))


def test_unknown_options_are_user_errors() -> None:
    with pytest.raises(UserError, match=r"unknown task\.loss 'sphereface'"):
        build_task({"name": "embedding", "loss": "sphereface"})
    with pytest.raises(UserError, match=r"task\.embedding_dim=0 must be a positive"):
        build_task({"name": "embedding", "embedding_dim": 0})


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def embedding_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(working folder, run folder, MLflow run id) of one tiny real run."""
    cwd = tmp_path_factory.mktemp("embedding")
    folder, run_id, result = train_in(cwd, *TINY)
    for name in ("test/tar_at_far_1e-2", "test/eer", "test/map_at_r"):
        assert re.search(rf"{name}\s+\d\.\d+", result.stdout), name
    return cwd, folder, run_id


def test_a_run_logs_the_open_set_metrics_and_the_report(embedding_run) -> None:
    cwd, folder, run_id = embedding_run
    client = mlflow.MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")
    run = client.get_run(run_id)
    metrics = run.data.metrics
    expected = {"test/tar_at_far_1e-2", "test/tar_at_far_1e-3", "test/eer", "test/roc_auc",
                "test/verify_acc", "test/precision_at_1", "test/map_at_r", "best/val/map_at_r",
                "verify/threshold"}  # fmt: skip
    assert expected <= set(metrics)
    assert all(0 <= metrics[name] <= 1 for name in expected - {"verify/threshold"})
    assert "val/loss" not in metrics  # the losses classify training identities only
    assert run.data.tags["task.compare_metrics"].startswith("test/tar_at_far_1e-2,test/map_at_r")
    files = {Path(a.path).name for a in client.list_artifacts(run_id, "test")}
    assert {"roc.png", "embeddings_2d.png", "neighbours.png"} <= files
    chosen = json.loads((folder / "verification.json").read_text())
    assert chosen["far"] == 0.01 and chosen["chosen_on"] == "val"
    assert chosen["threshold"] == pytest.approx(metrics["verify/threshold"])


def test_embed_writes_normalised_embeddings_and_an_index(embedding_run, tmp_path: Path) -> None:
    cwd, folder, _ = embedding_run
    write_identities(tmp_path / "images", {"a": 2, "b": 1})
    (tmp_path / "images" / "b" / "broken.jpg").write_bytes(b"not an image")
    result = transferlab("embed", f"run={folder}", f"images={tmp_path / 'images'}",
                         f"out={tmp_path / 'out'}", cwd=cwd)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 unreadable file" in result.stdout
    vectors = np.load(tmp_path / "out" / "embeddings.npy")
    index = (tmp_path / "out" / "index.csv").read_text().splitlines()
    assert vectors.shape == (3, 128) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert index[0] == "row,file" and index[1] == f"0,{tmp_path / 'images' / 'a' / '0.jpg'}"


def test_verify_prints_the_similarity_and_the_decision(embedding_run, tmp_path: Path) -> None:
    cwd, folder, _ = embedding_run
    write_identities(tmp_path, {"a": 2})
    images = [str(tmp_path / "a" / f"{i}.jpg") for i in range(2)]
    result = transferlab("verify", f"run={folder}", *images, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    threshold = json.loads((folder / "verification.json").read_text())["threshold"]
    printed = re.search(
        r"cosine similarity (-?\d\.\d{4}), threshold (-?\d\.\d{4}) \(false accept rate 0\.01 "
        r"on val\): (same identity|different identities)",
        result.stdout,
    )
    assert printed, result.stdout
    similarity, shown, decision = printed.groups()
    assert shown == f"{threshold:.4f}"
    assert decision == (
        "same identity" if float(similarity) >= threshold else "different identities"
    )


def test_verify_needs_two_images(capsys) -> None:
    from transferlab.cli import main

    assert main(["verify", "run=anything", "a.jpg"]) == 1  # refused before loading the run
    assert capsys.readouterr().err == (
        "transferlab: error: verify compares two images, 1 given; see --help\n"
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("identities")
    write_identities(root / "few", {f"p{i}": 3 for i in range(4)})
    write_identities(root / "singles", {f"p{i}": 1 for i in range(6)})
    return root


BAD_INPUTS = [
    pytest.param(["data=identity_folder", "data.root={root}/few"],
                 "data.root={root}/few has 4 identities with 2 images or more, the split needs",
                 id="few"),
    pytest.param(["data=identity_folder", "data.root={root}/singles"],
                 "none of the 6 identities in data.root={root}/singles has "
                 "data.min_images_per_identity=2", id="singles"),
    # Also refused in-process by the task's constructor (fast tests above): slow here.
    pytest.param(["task.embedding_dim=0"], "task.embedding_dim=0 must be a positive whole number",
                 marks=pytest.mark.slow, id="dim"),
    pytest.param(["task.loss=sphereface"], "unknown task.loss 'sphereface': choose from arcface",
                 marks=pytest.mark.slow, id="loss"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "expected"), BAD_INPUTS)
def test_bad_inputs_are_one_line_errors(folders: Path, overrides: list[str], expected: str) -> None:
    overrides = [o.replace("{root}", str(folders)) for o in overrides]
    result = transferlab("train", "task=embedding", *overrides, "tracking.enabled=false",
                         cwd=folders)  # fmt: skip
    assert expected.replace("{root}", str(folders)) in error_line(result)


@pytest.mark.slow  # 22 s on 2 cores: over the fast suite's share; `make test-slow` runs it
def test_a_sweep_of_losses_is_one_parent_compared_on_the_tasks_metrics(tmp_path: Path) -> None:
    result = transferlab("train", "-m", *TINY, "task.loss=softmax,arcface,cosface",
                         f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    parents, children = sweep_runs(tmp_path)
    assert len(parents) == 1 and len(children) == 3
    assert {run.data.params["task.loss"] for run in children} == {"softmax", "arcface", "cosface"}
    assert all(math.isfinite(run.data.metrics["test/map_at_r"]) for run in children)
    header = (tmp_path / "sweep" / "comparison.md").read_text().splitlines()[0]
    assert "best val/map_at_r" in header and "test/tar_at_far_1e-2" in header
    compared = transferlab("compare", str(tmp_path / "sweep"), cwd=tmp_path)
    assert compared.returncode == 0 and "test/map_at_r" in compared.stdout
