"""Building a run from its config: data, network, strategy, module, callbacks, trainer.

The CLI (``transferlab.train``), the benchmarks and the tests all build through these
functions, so there is one recipe. The task (``task=``) decides the data and the network;
nothing here asks which task runs.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from transferlab.errors import UserError

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch import nn

    from transferlab.callbacks import TrainingWatch
    from transferlab.finetune import FinetuneStrategy
    from transferlab.module import TransferModule
    from transferlab.runtime import Runtime
    from transferlab.tasks import Task


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The task's data module, set up (``num_classes`` and ``class_names`` known)."""
    from transferlab.tasks import build_task

    return build_task(task_options(cfg)).build_datamodule(cfg)


def task_options(cfg: DictConfig) -> dict[str, Any] | None:
    task = cfg.get("task")
    return OmegaConf.to_container(task, resolve=True) if task is not None else None


def instantiate(node: DictConfig, allowed: list[str], where: str) -> Any:
    """Build ``node`` from its ``_target_``; every ``_target_`` in it, nested ones too, must
    match one of ``allowed_targets``. A refusal names the target and its config path."""
    from hydra.errors import InstantiationException

    from transferlab.checks import refused_target, refused_target_error

    refused = refused_target(OmegaConf.to_container(node, resolve=True), allowed, where)
    if refused is not None:
        raise refused_target_error(*refused, allowed)
    try:
        built = hydra.utils.instantiate(node, _execution_whitelist_=list(allowed))
    except TypeError as err:
        if not _BAD_ARGUMENT.search(str(err)):
            raise
        raise UserError(f"{where}: {str(err).splitlines()[0]}; fix or remove that key") from None
    except InstantiationException as err:
        if "whitelist" not in str(err):
            raise
        # Allowed by the list, refused by Hydra itself (a target that runs programs or code).
        key = _FULL_KEY.search(str(err))
        path = where if key is None else key.group(1)
        path = path if path.startswith(where) else f"{where}.{path}"
        raise UserError(f"{path}: {' '.join(str(err).split('full_key:')[0].split())}") from None
    if isinstance(built, functools.partial):  # called later: check its arguments now
        try:
            inspect.signature(built.func).bind_partial(*built.args, **built.keywords)
        except TypeError as err:
            target = node.get("_target_")
            raise UserError(f"{where}: {target} {err}; fix or remove that key") from None
    return built


_BAD_ARGUMENT = re.compile(r"unexpected keyword argument|missing \d+ required|got multiple values")
_FULL_KEY = re.compile(r"full_key: (\S+)")


def build_callbacks(cfg: DictConfig | None, allowed: list[str]) -> list[pl.Callback]:
    return [instantiate(entry, allowed, f"callbacks.{name}") for name, entry in (cfg or {}).items()]


def build_trainer(
    cfg: DictConfig, callbacks: list, logger: Any, root_dir: str, **extra: Any
) -> pl.Trainer:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from transferlab.callbacks import LearningRates
    from transferlab.runtime import RUNTIME_KEYS

    options = OmegaConf.to_container(cfg, resolve=True)
    options = {k: v for k, v in options.items() if k not in RUNTIME_KEYS}
    if options.get("sync_batchnorm") == "auto":  # decided by ddp_options for several ranks
        options["sync_batchnorm"] = False
    options.update(extra)  # the run's own choices (a DDP strategy object for "ddp")
    if not logger:  # nothing to record learning rates into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRates)]
    try:
        return pl.Trainer(
            **options,
            callbacks=callbacks,
            logger=logger,
            default_root_dir=root_dir,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
            # The loaders shard themselves under DDP (``data.samplers``), keeping the
            # (seed, epoch) order and counting each validation and test image once.
            use_distributed_sampler=False,
        )
    except TypeError as err:
        raise UserError(f"trainer config: {err}") from None


def with_feature_cache(
    datamodule: Any, strategy: Any, task: Task, max_epochs: int
) -> tuple[pl.LightningDataModule, dict[str, Any]]:
    """The data to fit on (cached features where valid) and the Trainer options it needs."""
    from transferlab.finetune.cache import FeatureCacheDataModule, cache_blocker

    blocker = cache_blocker(strategy, datamodule.augment_name, max_epochs)
    if blocker is None and not task.supports_feature_cache:
        blocker = f"task={task.name} needs the backbone's spatial features, not pooled ones"
    if blocker is not None:
        if strategy.frozen_epochs() > 0 and strategy.feature_cache:
            print(f"Feature cache off: {blocker}.", flush=True)
        return datamodule, {}
    frozen = strategy.frozen_epochs()
    print(
        "Feature cache on: the frozen backbone runs once and the head trains on its cached"
        f" features {'in every epoch' if frozen >= max_epochs else f'in the first {frozen} epoch(s)'}.",
        flush=True,
    )
    cached = FeatureCacheDataModule(datamodule, strategy)
    return cached, ({"reload_dataloaders_every_n_epochs": 1} if frozen < max_epochs else {})


@dataclass
class RunParts:
    """Everything a run trains and tests with, built from its config."""

    task: Task
    datamodule: pl.LightningDataModule
    network: nn.Module
    strategy: FinetuneStrategy
    module: TransferModule
    callbacks: list
    watch: TrainingWatch
    fit_data: pl.LightningDataModule
    trainer_options: dict[str, Any]


def build_parts(cfg: DictConfig, runtime: Runtime | None = None) -> RunParts:
    """Data, network, strategy, module and callbacks for ``cfg``, as the CLI builds them."""
    from transferlab.callbacks import EpochSeed, TrainingWatch
    from transferlab.distributed import ddp_options, processes_per_node
    from transferlab.finetune import build_strategy
    from transferlab.module import TransferModule
    from transferlab.tasks import build_task
    from transferlab.tasks.base import require_support

    task = build_task(task_options(cfg))
    if (cfg.get("shift") or {}).get("name", "none") != "none":  # refused now, not after training
        require_support(task, "shifted_test_set", "shift=corruptions", "this run")
    datamodule = task.build_datamodule(cfg)
    network = task.build_network(cfg.model, datamodule.num_classes)
    strategy = build_strategy(cfg.finetune)
    allowed = list(cfg.allowed_targets)
    scheduler = instantiate(cfg.scheduler, allowed, "scheduler") if cfg.get("scheduler") else None
    module = TransferModule(
        network,
        num_classes=datamodule.num_classes,
        optimizer=instantiate(cfg.optimizer, allowed, "optimizer"),
        scheduler=scheduler,
        finetune=strategy,
        class_names=list(datamodule.class_names),
        runtime=runtime,
        task=task,
        criterion=task.criterion(cfg),
    )
    watch = TrainingWatch()
    callbacks = [*build_callbacks(cfg.get("callbacks"), allowed), strategy, watch]
    callbacks.append(EpochSeed(cfg.seed))
    fit_data, options = with_feature_cache(datamodule, strategy, task, cfg.trainer.max_epochs)
    if processes_per_node(cfg.trainer) * int(cfg.trainer.get("num_nodes", 1)) > 1:
        options.update(ddp_options(cfg.trainer, strategy, network))
    return RunParts(
        task, datamodule, network, strategy, module, callbacks, watch, fit_data, options
    )
