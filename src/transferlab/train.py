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
from omegaconf import DictConfig, open_dict

from transferlab import CONF_DIR
from transferlab.errors import UserError
from transferlab.tracking.record import sweep_job_num

if TYPE_CHECKING:
    from transferlab.machine import Setting
    from transferlab.resume import ResumePoint
    from transferlab.runtime import Runtime
    from transferlab.tracking import TrackedRun


# Known, harmless warnings that would bury the useful output.
QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*The number of training batches .* is smaller than the logging interval.*",
    ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    # DDP: epoch values are computed over every rank by torchmetrics (module.log_epoch).
    ".*when logging on epoch level in distributed setting.*",
)


def validate(cfg: DictConfig) -> None:
    """Catch config mistakes before any heavy work starts: before torch loads."""
    from transferlab.checks import check_config

    check_config(cfg)


def sweep_launcher() -> Mapping[str, Any] | None:
    """The Hydra launcher's config in a multirun job, None for a single run."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().launcher if sweep_job_num() is not None else None


def tracked_run(cfg: DictConfig, resume: ResumePoint | None = None):
    """The MLflow run of this job (a child of the sweep's parent run, in a sweep), or None.

    Runs of this experiment whose process died unseen (SIGKILL) are marked KILLED first.
    """
    import contextlib

    import mlflow

    from transferlab.sweeps import PARENT_RUN_ENV
    from transferlab.tracking import ensure_experiment, start_run
    from transferlab.tracking.liveness import mark_dead_runs
    from transferlab.tracking.record import run_name, task_overrides
    from transferlab.tracking.store import resolve_tracking_uri

    tracking = cfg.tracking
    if not tracking.enabled:
        if cfg.get("resume"):
            raise UserError("resume= continues an MLflow run: it needs tracking.enabled=true")
        return contextlib.nullcontext(None)
    uri = resolve_tracking_uri(tracking.uri, tracking.store_dir, tracking.get("server", False))
    experiment_id = ensure_experiment(tracking.experiment_name, uri, tracking.store_dir)
    mark_dead_runs(mlflow.MlflowClient(uri), experiment_id)
    parent = os.environ.get(PARENT_RUN_ENV) if sweep_job_num() is not None else None
    return start_run(
        uri,
        experiment_id,
        run_name(cfg, task_overrides()),
        parent_run_id=parent,
        run_id=resume.run_id if resume is not None else None,
        folder=cfg.paths.output_dir,
    )


def resume_of(cfg: DictConfig) -> ResumePoint | None:
    """Where run ``cfg.resume`` continues from (None for a new run)."""
    from transferlab.resume import requeued_run, resume_point

    if not cfg.get("resume") and cfg.tracking.enabled:
        requeued = requeued_run(cfg.paths.output_dir)
        if requeued is not None:
            print(f"SLURM restarted this job: continuing run {requeued}", flush=True)
            with open_dict(cfg):
                cfg.resume = requeued
    if not cfg.get("resume"):
        return None
    import mlflow

    from transferlab.tracking.store import resolve_tracking_uri

    tracking = cfg.tracking
    uri = resolve_tracking_uri(tracking.uri, tracking.store_dir, tracking.get("server", False))
    return resume_point(cfg, mlflow.MlflowClient(uri))


def run(cfg: DictConfig) -> float:
    """Train, validate and test one configuration; return the best monitored metric.

    The MLflow run starts before anything is built, so a job that fails anywhere (bad
    data, unknown model, diverging loss) is recorded as a FAILED run with its error.
    """
    from transferlab.distributed import is_rank_zero, job_workers, processes_per_node
    from transferlab.machine import plan_threads

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    validate(cfg)
    processes = processes_per_node(cfg.trainer)
    # Before torch loads.
    speed = plan_threads(cfg.get("num_threads"), sweep_launcher(), processes)
    with job_workers(cfg):  # DDP: ranks 1..N-1 start now and build while rank 0 does
        if not is_rank_zero():  # a DDP worker: trains and tests with rank 0, records nothing
            return fit_and_test(cfg, None, *runtime_of(cfg, speed))
        return tracked_fit_and_test(cfg, speed, processes)


def runtime_of(cfg: DictConfig, speed: dict[str, Setting]) -> tuple[Runtime, dict[str, Setting]]:
    """The run's hardware settings (``speed`` completed), torch's threads set and the
    random generators seeded."""
    import pytorch_lightning as pl
    import torch

    from transferlab.machine import Setting
    from transferlab.runtime import Runtime, device_type_of

    if speed["threads"].value:
        torch.set_num_threads(speed["threads"].value)
    speed["threads"] = Setting(torch.get_num_threads(), speed["threads"].why)
    device_type = device_type_of(cfg.trainer.get("accelerator", "auto"))
    runtime, runtime_speed = Runtime.from_config(cfg.trainer).resolve(device_type)
    speed.update(runtime_speed)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    return runtime, speed


def tracked_fit_and_test(cfg: DictConfig, speed: dict[str, Setting], processes: int) -> float:
    """Rank 0's (or the only process's) run, recorded in MLflow."""
    from transferlab.tracking.record import record_config

    runtime, speed = runtime_of(cfg, speed)
    resume = resume_of(cfg) if processes == 1 else None
    with tracked_run(cfg, resume) as run:
        if run is not None:
            from transferlab.resume import write_run_file

            write_run_file(cfg.paths.output_dir, run.run_id, run.experiment_id)
            if resume is None:
                record_config(run, cfg)
            else:
                count = int(run.client.get_run(run.run_id).data.tags.get("resume.count", 0))
                run.set_tags({"resume.count": count + 1, "resume.checkpoint": resume.checkpoint})
                print(f"Resuming run {run.run_id} from {resume.checkpoint}", flush=True)
        best = fit_and_test(cfg, run, runtime, speed, resume)
    if run is not None and run.offline:
        # Trained and tested; the record is incomplete, and scripts must see it.
        raise UserError(run.fallback.summary())
    return best


def fit_and_test(
    cfg: DictConfig,
    run: TrackedRun | None,
    runtime: Runtime,
    speed: dict[str, Setting],
    resume: ResumePoint | None = None,
) -> float:
    import torch

    from transferlab.build import build_parts, build_trainer
    from transferlab.robustness import evaluate_shift
    from transferlab.signals import trainer_calls
    from transferlab.tracking.record import (
        finetune_label,
        record_results,
        record_setup,
        report_speed,
        result_description,
    )

    parts = build_parts(cfg, runtime)
    if resume is not None:
        parts.datamodule.start_epoch = resume.epoch
    report_speed({**speed, **parts.datamodule.loader_settings()}, run)
    logger = run.logger(resumed=resume is not None) if run is not None else False
    trainer = build_trainer(
        cfg.trainer, parts.callbacks, logger, cfg.paths.output_dir, **parts.trainer_options
    )
    if run is not None:
        record_setup(run, parts.datamodule, parts.network)
        run.set_tags(
            {"task": parts.task.name, "task.compare_metrics": ",".join(parts.task.compare_metrics)}
        )
    started = time.perf_counter()
    with trainer_calls():
        trainer.fit(
            parts.module,
            datamodule=parts.fit_data,
            ckpt_path=str(resume.checkpoint) if resume is not None else None,
        )
    fit_seconds = time.perf_counter() - started
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint is not None else None
    if checkpoint is not None and checkpoint.best_model_score is not None:
        best = float(checkpoint.best_model_score)
    else:  # no checkpointing: the last value
        value = trainer.callback_metrics.get(cfg.monitor)
        best = float(value) if isinstance(value, torch.Tensor) else float("nan")
    started = time.perf_counter()
    with trainer_calls():
        results = trainer.test(
            parts.module, datamodule=parts.datamodule, ckpt_path=best_path or None, verbose=False
        )
    if trainer.world_size > 1:
        from transferlab.distributed import end_process_group

        end_process_group()  # every rank has tested: rank 0 reports alone
        if not trainer.is_global_zero:
            return best
    timings = {"time/fit_s": fit_seconds, "time/test_s": time.perf_counter() - started}
    test_metrics = {k: float(v) for k, v in results[0].items()} if results else {}
    summary = {
        f"best/{cfg.monitor}": best,
        # Every rank trains on as many images (its shard, padded).
        "perf/train_images_per_s": parts.watch.images * trainer.world_size / fit_seconds,
        **timings,
    }
    if run is not None:
        run.log_metrics(summary)
        record_results(run, cfg, parts.task, parts.module, parts.datamodule, best_path)
    started = time.perf_counter()
    title = f"{cfg.model.name}-{finetune_label(cfg)}: test set under corruptions"
    shifted = evaluate_shift(
        run, cfg, parts.task, parts.module, parts.datamodule, test_metrics, title
    )
    if shifted is not None:
        timings["time/shift_s"] = time.perf_counter() - started
        if run is not None:
            run.log_metrics({"time/shift_s": timings["time/shift_s"]})
    if run is not None:
        run.describe(result_description(parts.task, cfg.monitor, best, test_metrics, timings))
    print_summary({**test_metrics, **(shifted.metrics() if shifted else {}), **timings}, run, cfg)
    return best


def print_summary(results: Mapping[str, float], run: TrackedRun | None, cfg) -> None:
    from transferlab.tracking.redact import redact_uri
    from transferlab.tracking.store import is_server

    width = max(len(k) for k in results) if results else 0
    lines = ["", "Test metrics and timings:"]
    lines += [f"  {k:<{width}}  {v:.4f}" for k, v in results.items()]
    if run is not None:
        store = redact_uri(run.tracking_uri)
        page = f"#/experiments/{run.experiment_id}/runs/{run.run_id}"
        lines += [
            f"MLflow run: {run.run_id} (experiment {cfg.tracking.experiment_name!r}, "
            f"store {store})",
            f"Dashboard:  {store.rstrip('/')}/{page}"
            if is_server(store)
            else f"Dashboard:  transferlab ui   then open http://127.0.0.1:5000/{page}",
        ]
    print("\n".join(lines), flush=True)


# What Hydra itself may build from config: our sweep callback and its logging handlers.
# (Targets in the run's own config are checked against `allowed_targets` instead.)
HYDRA_TRUSTED = ["transferlab.*", "logging.*"]


@hydra.main(config_path=str(CONF_DIR), config_name="train", execution_whitelist=HYDRA_TRUSTED)
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from transferlab.signals import Interrupted

    try:
        return run(cfg)
    except Interrupted as stop:
        print(f"transferlab: stopped by {stop.name}; {resume_hint(cfg)}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except UserError as err:
        print(f"transferlab: error: {err}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # The job's MLflow run has ended FAILED with the error; the sweep goes on,
            # Optuna counts a NaN as a failed trial, and the sweep's summary lists it.
            return float("nan")
        sys.exit(1)


def resume_hint(cfg: DictConfig) -> str:
    """What to run to continue a stopped run."""
    from pathlib import Path

    from transferlab.resume import LAST_CHECKPOINT, RUN_FILE

    folder = Path(cfg.paths.output_dir)
    if not cfg.tracking.enabled or not (folder / RUN_FILE).is_file():
        return "the run was not tracked, so it cannot be resumed"
    if not (folder / LAST_CHECKPOINT).is_file():
        return "no epoch had finished, so there is no checkpoint: start it again"
    return (
        f"the run is KILLED; continue it from {folder / LAST_CHECKPOINT} with: "
        f"transferlab train resume={folder}"
    )


def launch(argv: list[str]) -> None:
    """Run the Hydra app on ``argv`` (``resume=`` expanded first); signals stop it cleanly."""
    from transferlab.checks import hydra_errors_in_one_line, quote_non_ascii
    from transferlab.resume import resume_argv
    from transferlab.signals import Interrupted, stop_on_signals

    with stop_on_signals(), hydra_errors_in_one_line():
        try:
            sys.argv = ["transferlab-train", *quote_non_ascii(resume_argv(argv))]
            main()
        except Interrupted as stop:  # outside a job: while composing, or between jobs
            print(f"transferlab: stopped by {stop.name}", file=sys.stderr)
            sys.exit(stop.exit_code)


if __name__ == "__main__":
    try:
        launch(sys.argv[1:])
    except UserError as err:
        print(f"transferlab: error: {err}", file=sys.stderr)
        sys.exit(1)
