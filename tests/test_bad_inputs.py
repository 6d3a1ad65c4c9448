"""Bad inputs through the real CLI: each ends with exit status 1 and one line on stderr,
``transferlab: error: ...``, without a traceback. A config mistake fails before torch loads;
a run that had started ends FAILED with the error as its tag; a good run afterwards works.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import OmegaConf, open_dict
from PIL import Image

from transferlab import CONF_DIR
from transferlab.checks import (
    TARGET_ARGUMENTS,
    check_config,
    hydra_error_line,
    quote_non_ascii,
)
from transferlab.models.input_size import min_image_size

BIN = Path(sys.executable).parent
# The repro command; each case adds or replaces overrides.
BASE = [
    "data=digits",
    "model=efficientnet_lite0",
    "finetune=linear_probe",
    "trainer.max_epochs=1",
]
ERROR = "transferlab: error: "


def merged(overrides: list[str]) -> list[str]:
    """BASE with the same keys replaced by ``overrides``, then the rest of ``overrides``."""
    keys = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    return [o for o in BASE if o.split("=", 1)[0].lstrip("+") not in keys] + overrides


def train(cwd: Path, store: Path, experiment: str, *overrides: str):
    """``transferlab train`` in a fresh process: (result, seconds, modules it imported)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "HYDRA_FULL_ERROR")
    }
    env["PYTHONPROFILEIMPORTTIME"] = "1"  # every import is listed on stderr
    command = [
        str(BIN / "transferlab"), "train", *merged(list(overrides)),
        f"hydra.run.dir={cwd / 'outputs' / experiment}",
        f"tracking.store_dir={store}", f"tracking.experiment_name={experiment}",
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    imported = set(re.findall(r"^import time:.*\|\s+(\S+)$", result.stderr, re.M))
    result.stderr = "\n".join(
        line for line in result.stderr.splitlines() if not line.startswith("import time:")
    )
    return result, seconds, imported


def the_error(result: subprocess.CompletedProcess) -> str:
    """The one error line (without its prefix), checked: status 1, nothing else on stderr."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), result.stderr[-3000:]
    assert result.returncode == 1
    return lines[0][len(ERROR) :]


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")


class OpensAFile:
    """Unpickled, creates ``marker``: what a malicious weights file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> dict[str, Path]:
    """Folders and files for the cases, and one MLflow store they all record into."""
    root = tmp_path_factory.mktemp("bad_inputs")
    for name in ("cat", "dog"):
        write_images(root / "good" / name, 10)
        write_images(root / "nested" / "images" / name, 3)
        write_images(root / "corrupt" / name, 5)
        write_images(root / "unicode" / "données été" / name, 10)
    write_images(root / "one" / "cat", 5)
    (root / "empty").mkdir()
    (root / "corrupt" / "dog" / "broken.jpg").write_bytes(b"not an image " * 20)
    (root / "garbage.pth").write_bytes(np.random.default_rng(0).bytes(300))
    store = root / "mlruns"
    store.mkdir()
    # Created here, so no run prints MLflow's one-time "creating tables" lines on stderr.
    mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}").search_experiments()
    return {"root": root, "store": store}


def client_for(place: dict[str, Path]) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{place['store'] / 'mlflow.db'}")


# ----------------------------------------------------------------------------- before torch

# (case id, overrides, what the error line says); {root} is the cases' folder.
CONFIG_MISTAKES = [
    ("one-class-folder", ["data=image_folder", "data.root={root}/one"],
     "{root}/one has one class folder (cat): classification needs two or more"),
    ("classes-one-level-deeper", ["data=image_folder", "data.root={root}/nested"],
     "the classes seem to be in {root}/nested/images: set data.root={root}/nested/images"),
    ("empty-folder", ["data=image_folder", "data.root={root}/empty"],
     "{root}/empty has no class sub-folders"),
    ("missing-data-path", ["data=image_folder", "data.root=/nonexistent"],
     "data.root=/nonexistent does not exist"),
    ("image-too-small-for-inception", ["data=fashion_mnist", "model=inception_v3"],
     "inception_v3 needs images of at least 75 px, but data.image_size=64: set data.image_size=75"),
    ("unknown-optimizer-argument", ["+optimizer.lrr=1"],
     "optimizer.lrr: torch.optim.AdamW takes no argument 'lrr' (did you mean lr?)"),
    ("optimizer-argument-type", ["optimizer.lr=abc"], "optimizer.lr='abc' must be a number"),
    ("unknown-scheduler-argument", ["+scheduler.max_lr=1"],
     "scheduler.max_lr: transferlab.optim.cosine_with_warmup takes no argument 'max_lr'"),
    ("zero-epochs", ["trainer.max_epochs=0"], "trainer.max_epochs=0 must be a whole number"),
    ("negative-epochs", ["trainer.max_epochs=-1"], "trainer.max_epochs=-1 must be a whole number"),
    ("zero-train-batches", ["+trainer.limit_train_batches=0"],
     "trainer.limit_train_batches=0 must be a number of batches"),
    ("nested-target", ["+optimizer.extra={_target_: torch.load}"],
     "optimizer.extra: _target_ 'torch.load' is not in allowed_targets"),
    ("target-injection", ["+callbacks.evil._target_=subprocess.Popen"],
     "callbacks.evil: _target_ 'subprocess.Popen' is not in allowed_targets"),
    ("seed-not-a-number", ["seed=abc"], "seed='abc' must be an integer"),
    ("mode", ["mode=avg"], "mode='avg' must be 'min' or 'max'"),
    ("monitor-not-validation", ["monitor=train/loss"], "monitor='train/loss' must be a validation"),
    ("negative-samples-per-class", ["data.samples_per_class=-1"],
     "data.samples_per_class=-1 must be a positive integer"),
    ("zero-threads", ["num_threads=0"], "num_threads=0 must be 1 or more"),
    ("unknown-model-key", ["+model.foo=1"], "unknown key(s) in model: foo"),
    ("missing-weights-file", ["model.weights=file", "model.weights_file={root}/none.pth"],
     "weights file not found: {root}/none.pth"),
    ("coco-without-annotations", ["task=detection", "data=coco"],
     "data=coco needs data.annotations=FILE"),
    ("missing-coco-file", ["task=detection", "data=coco", "data.annotations={root}/none.json"],
     "data.annotations={root}/none.json does not exist"),
    ("unresolvable-interpolation", ["optimizer.lr=${nope}"],
     "optimizer.lr: Interpolation key 'nope' not found"),
    # Hydra's own refusals, before the job starts.
    ("unknown-config-option", ["model=nope"], "Available options in 'model': efficientnet_lite0"),
    ("override-syntax", ["optimizer.lr==1"], "Error parsing override 'optimizer.lr==1'"),
    ("key-without-plus", ["optimizer.nope=1"], "To append to your config use +optimizer.nope=1"),
    ("detector-without-detection", ["detector=retinanet"], "Could not override 'detector'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "overrides", "expected"),
    CONFIG_MISTAKES,
    ids=[c.values[0] if hasattr(c, "values") else c[0] for c in CONFIG_MISTAKES],
)
def test_config_mistakes_fail_in_one_line_before_torch_loads(
    place, case: str, overrides: list[str], expected: str
) -> None:
    root = str(place["root"])
    overrides = [o.replace("{root}", root) for o in overrides]
    result, seconds, imported = train(place["root"], place["store"], case, *overrides)
    assert expected.replace("{root}", root) in the_error(result)
    assert "torch" not in imported and "pytorch_lightning" not in imported
    assert seconds < 10  # about 0.5 s on a quiet machine
    assert client_for(place).get_experiment_by_name(case) is None  # no run was started


# ----------------------------------------------------------------------------- in a run

RUN_FAILURES = [
    ("unknown-model-name", ["model.name=resnet5O"], "unknown model 'resnet5O': did you mean"),
    ("corrupt-image", ["data=image_folder", "data.root={root}/corrupt", "data.image_size=32"],
     "unreadable image {root}/corrupt/dog/broken.jpg"),
    ("corrupt-checkpoint", ["model.weights=file", "model.weights_file={root}/garbage.pth"],
     "could not read weights file {root}/garbage.pth"),
]  # fmt: skip


def assert_failed_run(place: dict[str, Path], experiment: str, message: str) -> None:
    client = client_for(place)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == f"UserError: {message}"
    assert run.data.tags["mlflow.note.content"] == f"**Failed**: UserError: {message}"


@pytest.mark.parametrize(
    ("case", "overrides", "expected"), RUN_FAILURES, ids=[c[0] for c in RUN_FAILURES]
)
def test_mistakes_found_in_a_run_end_it_failed(
    place, case: str, overrides: list[str], expected: str
) -> None:
    root = str(place["root"])
    overrides = [o.replace("{root}", root) for o in overrides]
    result, _, _ = train(place["root"], place["store"], case, *overrides)
    message = the_error(result)
    assert expected.replace("{root}", root) in message
    assert_failed_run(place, case, message)


def test_a_malicious_weights_file_is_refused_unexecuted(place) -> None:
    import torch

    # The payload works: loaded without weights_only, it creates its marker.
    control = place["root"] / "control_marker"
    torch.save({"state_dict": OpensAFile(control)}, place["root"] / "control.pth")
    torch.load(place["root"] / "control.pth", weights_only=False)
    assert control.exists()

    marker = place["root"] / "marker"
    torch.save({"state_dict": OpensAFile(marker)}, place["root"] / "evil.pth")
    overrides = ["model.weights=file", f"model.weights_file={place['root'] / 'evil.pth'}"]
    result, _, _ = train(place["root"], place["store"], "malicious-pickle", *overrides)
    message = the_error(result)
    assert not marker.exists()
    assert message.startswith(f"could not read weights file {place['root'] / 'evil.pth'}")
    assert "Unsupported global: GLOBAL io.open" in message  # builtins.open, refused by name
    assert_failed_run(place, "malicious-pickle", message)


# ----------------------------------------------------------------------------- the checks


def compose_train(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=list(overrides))
    with open_dict(cfg):  # no hydra:runtime outside a Hydra run
        cfg.paths.root = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "out")
    return cfg


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


GOOD_CONFIGS = [(g, o) for g in ("model", "optimizer", "scheduler", "trainer") for o in options(g)]
GOOD_CONFIGS += [(g, o) for g in ("data", "experiment", "finetune", "task") for o in options(g)]


def test_every_shipped_option_passes_the_checks(place, tmp_path: Path) -> None:
    """No false alarm: each option of each group, with the data it runs on by default."""
    for group, option in GOOD_CONFIGS:
        overrides = [f"{group}={option}"]
        if option in ("image_folder", "identity_folder"):
            overrides.append(f"data.root={place['root'] / 'good'}")
        if option == "seg_folder":
            overrides.append("data.root=/images")
        if option == "coco":
            (tmp_path / "train.json").write_text("{}")  # only its existence is checked
            overrides.append(f"data.annotations={tmp_path / 'train.json'}")
        if option == "inception_v3":  # 64 px is too small for it (test above)
            overrides.append("data.image_size=75")
        check_config(compose_train(tmp_path, *overrides))


def test_argument_table_matches_the_targets_and_the_config_files() -> None:
    """TARGET_ARGUMENTS names exactly what each target takes from config, and every key the
    optimizer and scheduler files set."""
    import inspect

    import hydra

    supplied = {"params", "optimizer", "total_steps", "steps_per_epoch", "restarts"}
    for target, arguments in TARGET_ARGUMENTS.items():
        signature = inspect.signature(hydra.utils.get_object(target))
        assert set(arguments) == set(signature.parameters) - supplied, target
    for group in ("optimizer", "scheduler"):
        for path in (CONF_DIR / group).glob("*.yaml"):
            node = OmegaConf.to_container(OmegaConf.load(path))
            if "_target_" not in node:
                continue
            assert node["_target_"] in TARGET_ARGUMENTS, path
            keys = set(node) - {"_target_", "_partial_"}
            assert keys <= set(TARGET_ARGUMENTS[node["_target_"]]), path


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=nope"], "Could not find 'model/nope'; Available options in 'model': "
         "efficientnet_lite0, efficientnet_lite1"),
        (["optimizer.lrr=1"], "Could not override 'optimizer.lrr'; To append to your config "
         "use +optimizer.lrr=1; Key 'lrr' is not in struct. Did you mean: 'lr'?"),
        (["optimizer.lr==1"], "Error parsing override 'optimizer.lr==1'; extraneous input '='"),
    ],
)  # fmt: skip
def test_hydra_refusals_read_as_one_line(overrides: list[str], expected: str) -> None:
    refusals = (ConfigCompositionException, OverrideParseException)
    with initialize_config_dir(config_dir=str(CONF_DIR)), pytest.raises(refusals) as raised:
        compose("train", overrides=overrides)
    line = hydra_error_line(raised.value)
    assert "\n" not in line and expected in line


def test_non_ascii_override_values_are_quoted_for_hydra(tmp_path: Path) -> None:
    argv = ["-m", "data.root=/d/données été", "seed=1,2", "data.root=/a/é,/b/ü", "x='é'"]
    quoted = quote_non_ascii(argv)
    assert quoted == ["-m", 'data.root="/d/données été"', *argv[2:]]
    cfg = compose_train(tmp_path, quoted[1])
    assert cfg.data.root == "/d/données été"
    with pytest.raises(OverrideParseException):
        compose_train(tmp_path, argv[1])


@pytest.mark.slow
@pytest.mark.parametrize("option", options("model"))
def test_each_model_config_runs_from_its_minimum_image_size(option: str) -> None:
    """The MIN_IMAGE_SIZE table, measured again: a forward pass at the minimum works, one
    pixel less fails; a config without a minimum runs on the smallest data default (32 px)."""
    import torch

    from transferlab.models import build_classifier

    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose(overrides=[f"+model={option}", "model.pretrained=false"])
    network = build_classifier(cfg.model, num_classes=2).eval()
    minimum = min_image_size(cfg.model.name)
    with torch.inference_mode():
        for size in {minimum, max(minimum, 32)}:
            assert network(torch.zeros(1, 3, size, size)).shape == (1, 2)
        if minimum > 1:
            with pytest.raises(RuntimeError):
                network(torch.zeros(1, 3, minimum - 1, minimum - 1))


# ----------------------------------------------------------------------------- afterwards


def test_a_non_ascii_path_needs_no_quotes(place) -> None:
    folder = place["root"] / "unicode" / "données été"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(
        [str(BIN / "transferlab"), "train", "data=image_folder", f"data.root={folder}",
         "--cfg", "job"],
        cwd=place["root"], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"root: {folder}" in result.stdout


def test_a_good_run_after_the_bad_ones_finishes(place) -> None:
    """Last: a run on a non-ASCII path into the store the failed runs wrote to."""
    client = client_for(place)
    before = client.search_runs([e.experiment_id for e in client.search_experiments()])
    folder = place["root"] / "unicode" / "données été"
    overrides = ["data=image_folder", f'data.root="{folder}"', "data.image_size=32"]
    result, _, _ = train(place["root"], place["store"], "good", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = re.search(r"MLflow run: (\w+)", result.stdout).group(1)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["data.root"] == str(folder)
    assert "test/acc" in run.data.metrics
    after = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.run_id for r in before} | {run_id} == {r.info.run_id for r in after}
    assert all(r.info.status == "FAILED" for r in before)
