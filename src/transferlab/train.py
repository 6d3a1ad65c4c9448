"""`transferlab train`: fine-tune, validate, test and record one run (or a Hydra sweep).

Usable as ``python -m transferlab.train [overrides]`` too.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from transferlab.errors import UserError

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from transferlab.data import TransferDataModule
    from transferlab.machine import Setting
    from transferlab.runtime import Runtime
    from transferlab.tracking import TrackedRun

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# Known, harmless warnings that would bury the useful output.
QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*The number of training batches .* is smaller than the logging interval.*",
    ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
)


def validate(cfg: DictConfig) -> None:
    """Catch config mistakes before any heavy work starts."""
    if cfg.mode not in ("min", "max"):
        raise UserError(f"mode={cfg.mode!r} must be 'min' or 'max'")
    if not str(cfg.monitor).startswith("val/"):
        raise UserError(f"monitor={cfg.monitor!r} must be a validation metric such as val/acc")
    if not isinstance(cfg.seed, int):
        raise UserError(f"seed={cfg.seed!r} must be an integer")
    for name, entry in (cfg.get("callbacks") or {}).items():
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            raise UserError(f"callbacks.{name} needs a _target_ (a callback class path)")


def build_datamodule(cfg: DictConfig) -> TransferDataModule:
    from transferlab.data import TransferDataModule
    from transferlab.models import model_data_config

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    augment = OmegaConf.to_container(cfg.augment, resolve=True) if cfg.get("augment") else None
    try:
        datamodule = TransferDataModule(
            **data_cfg, seed=cfg.seed, data_config=model_data_config(cfg.model), augment=augment
        )
    except TypeError as err:
        raise UserError(f"data config: {err}") from None
    datamodule.setup("fit")
    return datamodule


def instantiate(node: DictConfig, allowed: list[str], where: str) -> Any:
    """Build ``node`` from its ``_target_``, which must match one of ``allowed_targets``."""
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, _execution_whitelist_=list(allowed))
    except InstantiationException as err:
        if "whitelist" not in str(err):
            raise
        raise UserError(
            f"{where}: _target_ {node.get('_target_')!r} is not in allowed_targets; "
            f"to trust it, add its package: 'allowed_targets=[{','.join(allowed)},your_pkg.*]'"
        ) from None


def build_callbacks(cfg: DictConfig | None, allowed: list[str]) -> list[pl.Callback]:
    return [instantiate(entry, allowed, f"callbacks.{name}") for name, entry in (cfg or {}).items()]


def build_trainer(
    cfg: DictConfig, callbacks: list, logger: Any, root_dir: str, **extra: Any
) -> pl.Trainer:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

    from transferlab.runtime import RUNTIME_KEYS

    options = OmegaConf.to_container(cfg, resolve=True)
    options = {k: v for k, v in options.items() if k not in RUNTIME_KEYS}
    if not logger:  # nothing to record learning rates into
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    try:
        return pl.Trainer(
            **options,
            callbacks=callbacks,
            logger=logger,
            default_root_dir=root_dir,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
            **extra,
        )
    except TypeError as err:
        raise UserError(f"trainer config: {err}") from None


def with_feature_cache(
    datamodule: TransferDataModule, strategy: Any, max_epochs: int
) -> tuple[pl.LightningDataModule, dict[str, Any]]:
    """The data to fit on (cached features where valid) and the Trainer options it needs."""
    from transferlab.finetune.cache import FeatureCacheDataModule, cache_blocker

    blocker = cache_blocker(strategy, datamodule.augment_name, max_epochs)
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


def run_name(cfg: DictConfig, overrides: list[str]) -> str:
    if cfg.tracking.get("run_name"):
        return str(cfg.tracking.run_name)
    shown = [o for o in overrides if not o.startswith(("model=", "hydra."))]
    return " ".join([f"{cfg.model.name}-{cfg.finetune.strategy}", *shown])[:250]


def task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def record_config(run: TrackedRun, cfg: DictConfig) -> None:
    """Config as params; provenance and sweep membership as tags; the config files as artifacts."""
    from transferlab.tracking import provenance
    from transferlab.tracking.params import flatten

    run.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
    overrides = task_overrides()
    tags = {
        **provenance.git_state(Path(__file__).parent),
        "command": provenance.command_line(),
        "overrides": " ".join(overrides) or "(none)",
        "output_dir": cfg.paths.output_dir,
        **{f"version.{k}": v for k, v in provenance.package_versions().items()},
    }
    job_num = sweep_job_num()
    if job_num is not None:
        tags["sweep.job_num"] = job_num
    run.set_tags(tags)
    hydra_dir = Path(cfg.paths.output_dir) / ".hydra"
    if hydra_dir.is_dir():
        run.log_artifact(hydra_dir, "config")


def record_setup(run: TrackedRun, datamodule: TransferDataModule, network: Any) -> None:
    """What the data and the network turned out to be."""
    run.set_tags(
        {"data.fingerprint": datamodule.fingerprint(), "data.summary": datamodule.summary()}
    )
    total = sum(p.numel() for p in network.parameters())
    run.log_params({"model.params_total": str(total)})


def record_results(
    run: TrackedRun, cfg: DictConfig, module: Any, datamodule: Any, best_path: str | None
) -> None:
    """Confusion matrix, per-class metrics and the best checkpoint as artifacts."""
    import matplotlib.pyplot as plt

    from transferlab.reports import confusion_figure, per_class_metrics

    confusion = module.test_confusion.compute().cpu().numpy()
    names = list(datamodule.class_names)
    figure = confusion_figure(confusion, names, title=f"{cfg.model.name}: test set")
    run.log_figure(figure, "test/confusion_matrix.png")
    plt.close(figure)
    rows = per_class_metrics(confusion, names)
    header = ",".join(rows[0])
    lines = [",".join(str(v) for v in row.values()) for row in rows]
    run.log_text("\n".join([header, *lines]) + "\n", "test/per_class_metrics.csv")
    if best_path and cfg.tracking.get("log_checkpoint", True):
        run.log_artifact(best_path, "checkpoints")


def print_summary(results: Mapping[str, float], run: TrackedRun | None, cfg) -> None:
    width = max(len(k) for k in results) if results else 0
    lines = ["", "Test metrics and timings:"]
    lines += [f"  {k:<{width}}  {v:.4f}" for k, v in results.items()]
    if run is not None:
        lines += [
            f"MLflow run: {run.run_id} (experiment {cfg.tracking.experiment_name!r}, "
            f"store {run.tracking_uri})",
            "Dashboard:  transferlab ui   then open "
            f"http://127.0.0.1:5000/#/experiments/{run.experiment_id}/runs/{run.run_id}",
        ]
    print("\n".join(lines), flush=True)


def sweep_job_num() -> int | None:
    """This job's number in a Hydra multirun, or None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return int(HydraConfig.get().job.num)


def sweep_launcher() -> Mapping[str, Any] | None:
    """The Hydra launcher's config in a multirun job, None for a single run."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().launcher if sweep_job_num() is not None else None


def report_speed(settings: Mapping[str, Setting], run: TrackedRun | None) -> None:
    """Print the speed settings chosen for this machine, and tag the run with them."""
    from transferlab.machine import cpu, setting_lines, setting_tags

    print("\n".join([f"Speed settings on {cpu().describe()}:", *setting_lines(settings)]))
    if run is not None:
        run.set_tags({"machine.cpu": cpu().describe(), **setting_tags(settings)})


def tracked_run(cfg: DictConfig):
    """The MLflow run of this job (a child of the sweep's parent run, in a sweep), or None."""
    import contextlib

    from transferlab.sweeps import PARENT_RUN_ENV
    from transferlab.tracking import ensure_experiment, start_run
    from transferlab.tracking.store import resolve_tracking_uri

    tracking = cfg.tracking
    if not tracking.enabled:
        return contextlib.nullcontext(None)
    uri = resolve_tracking_uri(tracking.uri, tracking.store_dir)
    experiment_id = ensure_experiment(tracking.experiment_name, uri, tracking.store_dir)
    parent = os.environ.get(PARENT_RUN_ENV) if sweep_job_num() is not None else None
    return start_run(uri, experiment_id, run_name(cfg, task_overrides()), parent_run_id=parent)


def run(cfg: DictConfig) -> float:
    """Train, validate and test one configuration; return the best monitored metric.

    The MLflow run starts before anything is built, so a job that fails anywhere (bad
    data, unknown model, diverging loss) is recorded as a FAILED run with its error.
    """
    from transferlab.machine import Setting, plan_threads

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    validate(cfg)
    speed = plan_threads(cfg.get("num_threads"), sweep_launcher())  # before torch loads

    import pytorch_lightning as pl
    import torch

    from transferlab.runtime import Runtime, device_type_of

    if speed["threads"].value:
        torch.set_num_threads(speed["threads"].value)
    speed["threads"] = Setting(torch.get_num_threads(), speed["threads"].why)
    device_type = device_type_of(cfg.trainer.get("accelerator", "auto"))
    runtime, runtime_speed = Runtime.from_config(cfg.trainer).resolve(device_type)
    speed.update(runtime_speed)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    with tracked_run(cfg) as run:
        if run is not None:
            record_config(run, cfg)
        return fit_and_test(cfg, run, runtime, speed)


def fit_and_test(
    cfg: DictConfig, run: TrackedRun | None, runtime: Runtime, speed: dict[str, Setting]
) -> float:
    import torch

    from transferlab.callbacks import TrainingWatch
    from transferlab.finetune import build_strategy
    from transferlab.models import build_classifier
    from transferlab.module import TransferModule

    datamodule = build_datamodule(cfg)
    report_speed({**speed, **datamodule.loader_settings()}, run)
    network = build_classifier(cfg.model, num_classes=datamodule.num_classes)
    strategy = build_strategy(cfg.finetune)
    allowed = list(cfg.allowed_targets)
    scheduler = instantiate(cfg.scheduler, allowed, "scheduler") if cfg.get("scheduler") else None
    module = TransferModule(
        network,
        num_classes=datamodule.num_classes,
        optimizer=instantiate(cfg.optimizer, allowed, "optimizer"),
        scheduler=scheduler,
        finetune=strategy,
        label_smoothing=cfg.loss.label_smoothing,
        class_names=list(datamodule.class_names),
        runtime=runtime,
    )
    watch = TrainingWatch()
    callbacks = [*build_callbacks(cfg.get("callbacks"), allowed), strategy, watch]

    logger = run.logger() if run is not None else False
    fit_data, extra = with_feature_cache(datamodule, strategy, cfg.trainer.max_epochs)
    trainer = build_trainer(cfg.trainer, callbacks, logger, cfg.paths.output_dir, **extra)
    if run is not None:
        record_setup(run, datamodule, network)
    started = time.perf_counter()
    trainer.fit(module, datamodule=fit_data)
    fit_seconds = time.perf_counter() - started
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint is not None else None
    if checkpoint is not None and checkpoint.best_model_score is not None:
        best = float(checkpoint.best_model_score)
    else:  # no checkpointing: the last value
        value = trainer.callback_metrics.get(cfg.monitor)
        best = float(value) if isinstance(value, torch.Tensor) else float("nan")
    started = time.perf_counter()
    results = trainer.test(
        module, datamodule=datamodule, ckpt_path=best_path or None, verbose=False
    )
    timings = {"time/fit_s": fit_seconds, "time/test_s": time.perf_counter() - started}
    test_metrics = {k: float(v) for k, v in results[0].items()} if results else {}
    summary = {
        f"best/{cfg.monitor}": best,
        "perf/train_images_per_s": watch.images / fit_seconds,
        **timings,
    }
    if run is not None:
        run.log_metrics(summary)
        record_results(run, cfg, module, datamodule, best_path)
    print_summary({**test_metrics, **timings}, run, cfg)
    return best


# What Hydra itself may build from config: our sweep callback and its logging handlers.
# (Targets in the run's own config are checked against `allowed_targets` instead.)
HYDRA_TRUSTED = ["transferlab.*", "logging.*"]


@hydra.main(config_path=str(CONF_DIR), config_name="train", execution_whitelist=HYDRA_TRUSTED)
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return run(cfg)
    except UserError as err:
        print(f"transferlab: error: {err}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # The job's MLflow run has ended FAILED with the error; the sweep goes on,
            # Optuna counts a NaN as a failed trial, and the sweep's summary lists it.
            return float("nan")
        sys.exit(1)


if __name__ == "__main__":
    main()
