"""Every option of every config group composes and builds what it describes."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from transferlab import CONF_DIR
from transferlab.build import build_callbacks, build_trainer, instantiate
from transferlab.errors import UserError
from transferlab.finetune import STRATEGIES, build_strategy

GROUPS = ["data", "model", "augment", "optimizer", "scheduler", "finetune", "trainer"]
GROUPS += ["callbacks", "tracking", "experiment", "hparams_search", "shift"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_train(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=list(overrides))
    # Outside a Hydra run the hydra:runtime resolvers have no value: pin the paths.
    with open_dict(cfg):
        cfg.paths.root = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "out")
    return cfg


ALL_OPTIONS = [(group, option) for group in GROUPS for option in options(group)]


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS, ids=[f"{g}={o}" for g, o in ALL_OPTIONS])
def test_every_option_composes_and_resolves(tmp_path: Path, group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option.endswith("_folder"):  # the user's own folders
        overrides.append("data.root=/images")
    cfg = compose_train(tmp_path, *overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    monitors = {"segmentation": "val/miou", "detection": "val/map", "embedding": "val/map_at_r"}
    assert resolved["monitor"] == monitors.get(resolved["task"]["name"], "val/acc")
    checkpoint = (resolved.get("callbacks") or {}).get("model_checkpoint")
    assert checkpoint is None or checkpoint["monitor"] == resolved["monitor"]


def test_groups_have_the_documented_options() -> None:
    assert {"efficientnet_lite0", "resnet50", "vgg16", "inception_v3"} <= set(options("model"))
    assert {"mobilenetv3_large_100", "resnet18_scratch"} <= set(options("model"))
    assert {"fashion_mnist", "digits", "image_folder", "cifar10"} <= set(options("data"))
    assert {"none", "basic", "randaugment"} <= set(options("augment"))
    assert {"cosine", "onecycle", "none"} <= set(options("scheduler"))
    assert set(options("finetune")) == {*STRATEGIES, "from_scratch"}


def test_sweep_presets_compose_with_their_hydra_settings(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        grid = compose("train", ["experiment=backbone_comparison"], return_hydra_config=True)
        search = compose("train", ["hparams_search=fmnist_optuna"], return_hydra_config=True)
        slurm = compose("train", ["hydra/launcher=slurm"], return_hydra_config=True)
    assert grid.hydra.sweeper.params.model.count("efficientnet_lite") == 3
    assert grid.hydra.sweeper.params.seed == "0,1,2"
    sweeper = search.hydra.sweeper
    assert sweeper._target_.endswith("ResumableOptunaSweeper")
    assert sweeper.max_failure_rate == 1.0 and sweeper.study_name == "fmnist_optuna"
    assert search.finetune.strategy == "partial" and "finetune.freeze_stages" in sweeper.params
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert slurm.hydra.launcher.gpus_per_node == 1 and slurm.hydra.launcher.cpus_per_task == 8


def test_monitor_is_declared_once_and_interpolated(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, "monitor=val/f1", "mode=max")
    assert cfg.callbacks.model_checkpoint.monitor == "val/f1"
    assert cfg.callbacks.early_stopping.monitor == "val/f1"
    # Declared in train.yaml, and by a task for its own metric; interpolated everywhere else.
    texts = {
        p.relative_to(CONF_DIR).as_posix(): p.read_text()
        for p in CONF_DIR.rglob("*.yaml")
        if p.name != "train.yaml" and p.parent.name != "task"
    }
    assert [name for name, text in texts.items() if "monitor: val/" in text] == []


@pytest.mark.parametrize("option", options("optimizer"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_optimizer_and_scheduler_instantiate(tmp_path: Path, option: str, scheduler: str) -> None:
    cfg = compose_train(tmp_path, f"optimizer={option}", f"scheduler={scheduler}")
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = instantiate(cfg.optimizer, cfg.allowed_targets, "optimizer")([{"params": params}])
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    if cfg.scheduler is not None:
        schedule = instantiate(cfg.scheduler, cfg.allowed_targets, "scheduler")(
            optimizer, total_steps=10, steps_per_epoch=5
        )
        lrs = []
        for _ in range(10):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert max(lrs) <= cfg.optimizer.lr * (1 + 1e-6)
        assert lrs[-1] < max(lrs)


@pytest.mark.parametrize("option", options("callbacks"))
def test_callbacks_and_trainer_instantiate(tmp_path: Path, option: str) -> None:
    cfg = compose_train(tmp_path, f"callbacks={option}", "trainer=debug")
    callbacks = build_callbacks(cfg.callbacks, cfg.allowed_targets)
    trainer = build_trainer(cfg.trainer, callbacks, logger=False, root_dir=str(tmp_path))
    assert isinstance(trainer, pl.Trainer)
    assert trainer.max_epochs == 1
    assert (trainer.checkpoint_callback is not None) == (option != "none")


@pytest.mark.parametrize("option", options("finetune"))
def test_finetune_options_build_their_strategy(tmp_path: Path, option: str) -> None:
    cfg = compose_train(tmp_path, f"finetune={option}")
    strategy = build_strategy(cfg.finetune)
    if option == "from_scratch":
        assert strategy.name == "full" and cfg.model.pretrained is False
    else:
        assert strategy.name == option
        # The config file is the one source of defaults: Python builds the same strategy.
        assert vars(build_strategy({"strategy": option})) == vars(strategy)


def test_targets_outside_the_allowed_list_are_refused(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, "+callbacks.evil._target_=subprocess.Popen")
    with pytest.raises(UserError, match="not in allowed_targets"):
        build_callbacks(cfg.callbacks, cfg.allowed_targets)


def test_data_options_build_their_datamodule(tmp_path: Path) -> None:
    from PIL import Image

    from transferlab.build import build_datamodule

    for name in ("a", "b"):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20 + i, 30), (40 * i, 0, 0)).save(
                tmp_path / "images" / name / f"{i}.png"
            )
    built = {
        "fashion_mnist": build_datamodule(compose_train(tmp_path, "data.samples_per_class=3")),
        "digits": build_datamodule(compose_train(tmp_path, "data=digits")),
        "image_folder": build_datamodule(
            compose_train(tmp_path, "data=image_folder", f"data.root={tmp_path / 'images'}")
        ),
    }
    assert built["fashion_mnist"].num_classes == 10 and len(built["fashion_mnist"].train_set) == 30
    assert built["digits"].num_classes == 10
    assert built["image_folder"].class_names == ("a", "b")
    x = built["image_folder"].train_set[0]["image"]
    assert tuple(x.shape) == (3, 224, 224)
    offline = compose_train(
        tmp_path, "data=cifar10", f"data.root={tmp_path}", "data.download=false"
    )
    with pytest.raises(UserError, match="CIFAR-10"):
        build_datamodule(offline)
