"""`transferlab train`: fine-tune, validate, test and record one run (or a Hydra sweep).

The run story, top to bottom: check the config, choose threads before torch loads, open
the MLflow run, build the parts (``transferlab.build``), fit, test, record. Usable as
``python -m transferlab.train [overrides]`` too.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from transferlab import CONF_DIR
from transferlab.errors import UserError
from transferlab.tracking.record import sweep_job_num

if TYPE_CHECKING:
    from transferlab.machine import Setting
    from transferlab.runtime import Runtime
    from transferlab.tracking import TrackedRun


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


def sweep_launcher() -> Mapping[str, Any] | None:
    """The Hydra launcher's config in a multirun job, None for a single run."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().launcher if sweep_job_num() is not None else None


def tracked_run(cfg: DictConfig):
    """The MLflow run of this job (a child of the sweep's parent run, in a sweep), or None."""
    import contextlib

    from transferlab.sweeps import PARENT_RUN_ENV
    from transferlab.tracking import ensure_experiment, start_run
    from transferlab.tracking.record import run_name, task_overrides
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
    from transferlab.tracking.record import record_config

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

    from transferlab.build import build_parts, build_trainer
    from transferlab.tracking.record import record_results, record_setup, report_speed

    parts = build_parts(cfg, runtime)
    report_speed({**speed, **parts.datamodule.loader_settings()}, run)
    logger = run.logger() if run is not None else False
    trainer = build_trainer(
        cfg.trainer, parts.callbacks, logger, cfg.paths.output_dir, **parts.trainer_options
    )
    if run is not None:
        record_setup(run, parts.datamodule, parts.network)
        run.set_tags(
            {"task": parts.task.name, "task.compare_metrics": ",".join(parts.task.compare_metrics)}
        )
    started = time.perf_counter()
    trainer.fit(parts.module, datamodule=parts.fit_data)
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
        parts.module, datamodule=parts.datamodule, ckpt_path=best_path or None, verbose=False
    )
    timings = {"time/fit_s": fit_seconds, "time/test_s": time.perf_counter() - started}
    test_metrics = {k: float(v) for k, v in results[0].items()} if results else {}
    summary = {
        f"best/{cfg.monitor}": best,
        "perf/train_images_per_s": parts.watch.images / fit_seconds,
        **timings,
    }
    if run is not None:
        run.log_metrics(summary)
        record_results(run, cfg, parts.task, parts.module, parts.datamodule, best_path)
    print_summary({**test_metrics, **timings}, run, cfg)
    return best


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
