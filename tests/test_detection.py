"""task=detection: the task seam's hooks, the freezing strategies on a detector, and runs
through the real CLI (fmnist_scenes, a sweep compared by mAP, and a COCO file)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from clitools import composed, error_line, transferlab
from hydra import compose, initialize_config_dir
from PIL import Image

from transferlab import CONF_DIR
from transferlab.build import build_parts
from transferlab.checks import check_config
from transferlab.errors import UserError
from transferlab.finetune.stages import backbone_stages
from transferlab.module import in_fp32
from transferlab.tasks import build_task

# A tiny detection run: 64 px scenes, a few batches of one epoch.
TINY = [
    "task=detection",
    "data.image_size=64",
    "data.train_images=8",
    "data.batch_size=4",
    "data.eval_batch_size=8",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
]
METRICS = {"test/map", "test/map_50", "test/map_75", "test/mar_100"}


@pytest.fixture(scope="module", autouse=True)
def scene_cache(tmp_path_factory: pytest.TempPathFactory):
    """The generated scenes (with their instances, for boxes) in a folder of this module's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRANSFERLAB_DATA", str(tmp_path_factory.mktemp("data")))
        yield


def tiny_config(tmp_path: Path, *overrides: str):
    return composed(tmp_path, *TINY, *overrides)


def client_for(folder: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")


# ----------------------------------------------------------------------------- config, seam


@pytest.mark.parametrize("detector", ["fcos", "retinanet", "fasterrcnn"])
def test_detector_picks_the_head_and_the_task_its_data_and_monitor(
    tmp_path: Path, detector: str
) -> None:
    cfg = tiny_config(tmp_path, f"detector={detector}", "model=resnet18")
    assert cfg.task.detector == detector and cfg.task.image_size == 64  # from data.image_size
    assert cfg.data.source == "fmnist_scenes" and cfg.monitor == "val/map"
    assert cfg.callbacks.model_checkpoint.monitor == "val/map"
    task = build_task(dict(cfg.task))
    assert task.detector == detector and not task.supports_feature_cache
    assert task.compare_metrics[0] == "test/map"


def test_detection_config_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="choose detector= from fcos, retinanet"):
        build_task({"name": "detection", "detector": "yolo"})
    with pytest.raises(UserError, match="not a detection source"):
        with initialize_config_dir(config_dir=str(CONF_DIR)):
            digits = compose("train", overrides=["task=detection", "data=digits"])
        build_task({"name": "detection"}).build_datamodule(digits)
    resized = tiny_config(tmp_path, "task.image_size=128")  # data.image_size=64
    with pytest.raises(UserError, match=r"task.image_size=128 .* for 64 px images"):
        build_task(resized.task).build_datamodule(resized)
    with pytest.raises(UserError, match=r"data=coco needs data\.annotations"):  # before torch
        check_config(tiny_config(tmp_path, "data=coco"))
    missing = tiny_config(
        tmp_path, "data=coco", "data.annotations=nope.json", f"data.root={tmp_path}"
    )
    with pytest.raises(UserError, match=r"data\.annotations=.*nope\.json does not exist"):
        check_config(missing)


def test_eval_outputs_in_fp32_keep_integer_labels() -> None:
    detections = [
        {
            "boxes": torch.ones(2, 4, dtype=torch.bfloat16),
            "scores": torch.ones(2, dtype=torch.bfloat16),
            "labels": torch.tensor([1, 2]),
        }
    ]
    converted = in_fp32(detections)
    assert converted[0]["boxes"].dtype == converted[0]["scores"].dtype == torch.float32
    assert converted[0]["labels"].dtype == torch.int64
    assert in_fp32(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32


def test_detections_on_crowd_regions_are_neither_hits_nor_false_positives() -> None:
    metrics = build_task({"name": "detection"}).metrics(3)
    person, crowd = [10.0, 10, 40, 60], [50.0, 0, 100, 100]
    hit = {
        "boxes": torch.tensor([person]),
        "scores": torch.tensor([0.6]),
        "labels": torch.tensor([1]),
    }
    on_crowd = {
        "boxes": torch.tensor([person, [55.0, 5, 95, 95]]),
        "scores": torch.tensor([0.6, 0.9]),
        "labels": torch.tensor([1, 1]),
    }
    flagged = {
        "boxes": torch.tensor([person, crowd]),
        "labels": torch.tensor([1, 1]),
        "iscrowd": torch.tensor([0, 1]),
    }
    values = metrics([on_crowd], [flagged])
    assert values["map"].item() == pytest.approx(1.0)  # the crowd detection is ignored
    assert metrics["scores"].per_class_boxes() == [0, 1, 0]  # the crowd is not a box to find
    metrics.reset()
    unflagged = {"boxes": torch.tensor([person]), "labels": torch.tensor([1])}
    assert metrics([on_crowd], [unflagged])["map"].item() < 1.0  # a false positive otherwise
    metrics.reset()
    assert metrics([hit], [unflagged])["map"].item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- strategies

# finetune option -> the backbone stages that stay frozen in the first epoch (None: all).
FROZEN_STAGES = {
    "linear_probe": None,
    "partial": 2,
    "gradual": None,
    "lp_ft": None,
    "full": 0,
    "from_scratch": 0,
}


@pytest.mark.parametrize("finetune", list(FROZEN_STAGES))
def test_each_strategy_trains_exactly_its_parameters_on_a_detector(
    tmp_path: Path, finetune: str
) -> None:
    import pytorch_lightning as pl

    cfg = tiny_config(tmp_path, f"finetune={finetune}", "model.pretrained=false")
    torch.manual_seed(0)
    parts = build_parts(cfg)
    assert parts.fit_data is parts.datamodule  # no feature cache for a detector
    network = parts.network
    stages = backbone_stages(network.backbone)
    frozen = len(stages) if FROZEN_STAGES[finetune] is None else FROZEN_STAGES[finetune]
    before = {k: v.clone() for k, v in network.state_dict().items()}
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[parts.strategy],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(parts.module, datamodule=parts.datamodule)
    after = network.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    head = {f"head.{k}" for k, _ in network.head.named_parameters()}
    assert head <= moved  # the FPN and the detector always train
    for i, names in enumerate(stages):
        stage_moved = {f"backbone.{n}" for n in names} & moved
        if i < frozen:
            assert not stage_moved, (finetune, i)
        else:
            assert stage_moved, (finetune, i)
    if frozen == len(stages):  # statistics too: a frozen backbone is in eval mode
        assert not any(k.startswith("backbone.") for k in moved)


# ----------------------------------------------------------------------------- CLI runs


@pytest.mark.slow  # 21 s on 2 cores; the classification sweep covers sweeps by default
def test_a_sweep_of_detectors_records_map_and_compares_runs_by_it(tmp_path: Path) -> None:
    result = transferlab(
        "train", "-m", *TINY, "detector=fcos,retinanet", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "faster_coco_eval" not in result.stdout  # COCOeval's summaries stay quiet
    client = client_for(tmp_path)
    experiment = client.get_experiment_by_name("transferlab").experiment_id
    children = [
        run for run in client.search_runs([experiment]) if "mlflow.parentRunId" in run.data.tags
    ]
    assert {run.data.params["task.detector"] for run in children} == {"fcos", "retinanet"}
    for run in children:
        metrics = run.data.metrics
        assert run.info.status == "FINISHED"
        assert METRICS | {"best/val/map", "val/map", "train/loss_classification"} <= set(metrics)
        assert "val/loss" not in metrics and "train/map" not in metrics
        assert 0.0 <= metrics["test/map"] <= metrics["test/map_50"] <= 1.0
        assert run.data.tags["task"] == "detection"
        files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "test")}
        assert {"per_class_ap.csv", "predictions.png", "pr_curves.png"} <= files
    table = (tmp_path / "sweep" / "comparison.md").read_text()
    header = table.splitlines()[0]
    assert "best val/map" in header and "test/map_50" in header and "test/acc" not in header
    compared = transferlab("compare", str(tmp_path / "sweep"), cwd=tmp_path)
    assert compared.returncode == 0 and "test/map" in compared.stdout
    run_id = children[0].info.run_id
    local = Path(client.download_artifacts(run_id, "test/per_class_ap.csv", str(tmp_path)))
    rows = local.read_text().splitlines()
    assert rows[0] == "class,ap,ap_50,boxes" and rows[1].startswith("T-shirt/top,")
    assert len(rows) == 11  # the ten classes, not the background


CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "bar"}]


def coco_split(folder: Path, name: str, first_id: int, count: int, crowd: bool = False) -> Path:
    """``count`` 48x40 images with a bright square and a bar each, and their COCO JSON."""
    rng = np.random.default_rng(first_id)
    images, annotations = [], []
    for image_id in range(first_id, first_id + count):
        pixels = np.full((40, 48, 3), 30, dtype=np.uint8)
        x, y = (int(v) for v in rng.integers(0, 20, 2))
        pixels[y : y + 12, x : x + 12] = (250, 40, 40)
        pixels[30:36, 4:44] = (40, 40, 250)
        Image.fromarray(pixels).save(folder / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 48, "height": 40})
        annotations.append({"image_id": image_id, "category_id": 1, "bbox": [x, y, 12, 12]})
        annotations.append({"image_id": image_id, "category_id": 2, "bbox": [4, 30, 40, 6]})
    if crowd:
        annotations.append(
            {"image_id": first_id, "category_id": 1, "bbox": [30, 0, 18, 25], "iscrowd": 1}
        )
    for i, annotation in enumerate(annotations):
        annotation |= {"id": first_id * 100 + i, "iscrowd": annotation.get("iscrowd", 0)}
        annotation["area"] = annotation["bbox"][2] * annotation["bbox"][3]
    path = folder / name
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
    )
    return path


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory: pytest.TempPathFactory):
    """(working folder, COCO data folder, the `transferlab train` result) of one tiny run on
    a COCO file through the real CLI, with the corruption suite."""
    tmp_path = tmp_path_factory.mktemp("coco_run")
    data = tmp_path / "coco"
    data.mkdir()
    coco_split(data, "train.json", 1, 6)
    coco_split(data, "val.json", 20, 2, crowd=True)
    coco_split(data, "test.json", 30, 3, crowd=True)
    result = transferlab(
        "train", "task=detection", "data=coco", f"data.root={data}", "data.annotations=train.json",
        "data.val_annotations=val.json", "data.test_annotations=test.json", "data.image_size=64",
        "data.batch_size=3", "trainer.max_epochs=1", "finetune=linear_probe",
        "shift=corruptions", "shift.corruptions=[gaussian_noise,rotate]", "shift.severities=[5]",
        f"hydra.run.dir={tmp_path / 'out'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path, data, result


def test_a_coco_file_trains_through_the_cli_into_a_finished_run(coco_run) -> None:
    tmp_path, _, result = coco_run
    assert "Feature cache on" not in result.stdout
    assert "rotate left out" in result.stdout  # it would move the pixels off their boxes
    run_id = re.search(r"MLflow run: (\w+)", result.stdout).group(1)
    client = client_for(tmp_path)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert set(run.data.metrics) >= METRICS
    assert run.data.params["data.source"] == "coco"
    assert "test_size=3" in run.data.tags["data.summary"]
    (dataset,) = run.inputs.dataset_inputs  # MLflow's Dataset column
    assert dataset.dataset.name == "coco"
    assert dataset.dataset.digest == run.data.tags["data.fingerprint"]
    files = {Path(a.path).name for a in client.list_artifacts(run_id, "test")}
    assert {"predictions.png", "gradcam.png"} <= files
    # The corruption suite ran through the detection task's evaluation step, without the
    # geometric corruption; one corruption at one severity is the whole mean.
    assert {"shift/gaussian_noise/map", "shift/mean/map", "shift/relative_drop/map"} <= set(
        run.data.metrics
    )
    assert not any(key.startswith("shift/rotate") for key in run.data.metrics)
    history = client.get_metric_history(run_id, "shift/gaussian_noise/map")
    assert [point.step for point in history] == [5]
    assert 0.0 <= history[0].value <= 1.0
    assert run.data.metrics["shift/mean/map"] == pytest.approx(history[0].value)
    local = Path(client.download_artifacts(run_id, "test/per_class_ap.csv", str(tmp_path)))
    rows = local.read_text().splitlines()
    assert rows[0] == "class,ap,ap_50,boxes" and len(rows) == 3
    # Three test images, each with one square and one bar; the crowd region is not a box.
    assert rows[1].startswith("square,") and rows[1].endswith(",3")
    assert rows[2].startswith("bar,") and rows[2].endswith(",3")


def test_predict_writes_boxes_in_each_images_own_pixels(
    coco_run, capsys: pytest.CaptureFixture
) -> None:
    from transferlab.inference import load_trained
    from transferlab.predict import main as predict

    tmp_path, data, _ = coco_run
    images = tmp_path / "predict"
    images.mkdir()
    Image.open(data / "30.png").save(images / "30.png")  # 48 x 40: the network sees 64 x 64
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    run, out = str(tmp_path / "out"), tmp_path / "boxes.json"
    assert predict([f"run={run}", f"images={images}", f"out={out}", "min_score=0"]) == 0
    assert "skipped 1 unreadable file(s)" in capsys.readouterr().out
    found = json.loads(out.read_text())
    assert found and {box["file_name"] for box in found} == {str(images / "30.png")}
    # What the network finds on the resized image, scaled to the 48 x 40 image by hand.
    model = load_trained(run)
    with Image.open(images / "30.png") as image, torch.inference_mode():
        network = model.network(model.transform(image.convert("RGB"))[None])[0]
    best = int(network["scores"].argmax())
    x1, y1, x2, y2 = (network["boxes"][best] * torch.tensor([48, 40, 48, 40]) / 64).tolist()
    top = max(found, key=lambda box: box["score"])
    assert top["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=0.01)
    assert top["category_name"] == ("square", "bar")[int(network["labels"][best]) - 1]
    assert all(b["bbox"][0] >= 0 and b["bbox"][0] + b["bbox"][2] <= 48.01 for b in found)
    scores = [box["score"] for box in found]
    assert scores == sorted(scores, reverse=True) and len(found) == len(network["scores"])
    # The CSV keeps only the boxes at or above min_score; a box-less image keeps its row.
    cutoff, out = scores[len(scores) // 2], tmp_path / "detections.csv"
    assert predict([f"run={run}", f"images={images}", f"min_score={cutoff}", f"out={out}"]) == 0
    rows = out.read_text().splitlines()
    assert rows[0] == "file,class,score,x1,y1,x2,y2"
    assert len(rows) - 1 == sum(score >= cutoff for score in scores)
    assert predict([f"run={run}", f"images={images}", "min_score=1", f"out={out}"]) == 0
    assert out.read_text().splitlines()[1:] == [f"{images / '30.png'},,,,,,"]
    for bad, message in (("top_k=3", "drop top_k="), ("min_score=2", "between 0 and 1")):
        with pytest.raises(UserError, match=message):
            predict([f"run={run}", f"images={images}", bad])
    result = transferlab("predict", f"run={run}", f"images={images}", "top_k=3", cwd=tmp_path)
    assert result.returncode != 0 and "drop top_k=" in error_line(result)


def test_mlflow_model_gives_what_predict_gives(coco_run) -> None:
    from test_mlflow_model import load_offline

    from transferlab.predict import main as predict

    tmp_path, data, result = coco_run
    run_id = re.search(r"MLflow run: (\w+)", result.stdout).group(1)
    assert f"MLflow model: runs:/{run_id}/model" in result.stdout
    model = load_offline(tmp_path, run_id)
    signature = model.metadata.signature
    assert signature.outputs.input_names() == ["detections", "boxes"]
    assert signature.params.to_dict()[0]["name"] == "min_score"
    files = [data / "30.png", data / "31.png"]
    out = tmp_path / "model_check.json"
    threshold = "0.1"
    assert predict([f"run={tmp_path / 'out'}", f"images={files[0]}", f"out={out}",
                    f"min_score={threshold}"]) == 0  # fmt: skip
    expected = json.loads(out.read_text())
    got = model.predict(
        pd.DataFrame({"image": [path.read_bytes() for path in files]}),
        params={"min_score": float(threshold)},
    )
    first = json.loads(got["detections"][0])
    assert list(got["boxes"]) == [len(json.loads(cell)) for cell in got["detections"]]
    assert len(first) == len(expected)
    for box, coco in zip(first, expected, strict=True):
        assert box["class"] == coco["category_name"]
        assert box["score"] == pytest.approx(coco["score"], abs=1e-5)
        x1, y1, x2, y2 = box["box"]
        assert [x1, y1, x2 - x1, y2 - y1] == pytest.approx(coco["bbox"], abs=0.01)
    fewer = model.predict(pd.DataFrame({"image": [files[0].read_bytes()]}))  # min_score 0.5
    assert fewer["boxes"][0] == sum(box["score"] >= 0.5 for box in first)


def test_grad_cam_explains_the_best_detections_class(coco_run) -> None:
    from transferlab.explain import main as explain
    from transferlab.inference import load_trained
    from transferlab.reports.gradcam import ClassScore, heat_maps

    tmp_path, data, _ = coco_run
    run, out = str(tmp_path / "out"), tmp_path / "explained"
    assert explain([f"run={run}", f"images={data / '30.png'}", f"out={out}"]) == 0
    assert (out / "30_gradcam.png").stat().st_size > 0 and (out / "gradcam.png").is_file()
    # The explained score is the sum of the best box's class's scores, and the map varies.
    found = {
        "scores": torch.tensor([0.2, 0.9, 0.4]),
        "labels": torch.tensor([2, 1, 1]),
        "boxes": torch.zeros(3, 4),
    }
    assert float(ClassScore()(found)) == pytest.approx(1.3)
    assert float(ClassScore(2)(found)) == pytest.approx(0.2)
    model = load_trained(run)
    with Image.open(data / "30.png") as image:
        batch = model.transform(image.convert("RGB"))[None]
    maps = heat_maps(model.network, batch)
    best = int(maps.outputs[0]["scores"].argmax())
    assert maps.classes == [int(maps.outputs[0]["labels"][best])]
    assert maps.maps.shape == (1, 64, 64) and float(maps.maps.max() - maps.maps.min()) > 0.1
