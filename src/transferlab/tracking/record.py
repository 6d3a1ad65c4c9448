"""What a run records in MLflow besides its metrics: config, provenance, set-up, results."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from transferlab.machine import Setting
    from transferlab.tasks import Task
    from transferlab.tracking import TrackedRun


def task_overrides() -> list[str]:
    """The job's overrides as typed (``${oc.env:...}`` left unresolved)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in OmegaConf.to_container(HydraConfig.get().overrides.task)]


def sweep_job_num() -> int | None:
    """This job's number in a Hydra multirun, or None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return int(HydraConfig.get().job.num)


def finetune_label(cfg: DictConfig) -> str:
    """The ``finetune=`` option the run chose (``from_scratch`` is one), else the strategy."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("finetune")
        if choice:
            return str(choice)
    return str(cfg.finetune.strategy)


def run_name(cfg: DictConfig, overrides: list[str]) -> str:
    if cfg.tracking.get("run_name"):
        return str(cfg.tracking.run_name)
    from transferlab.tracking.redact import redact_text

    shown = [o for o in overrides if not o.startswith(("model=", "hydra."))]
    return redact_text(" ".join([f"{cfg.model.name}-{finetune_label(cfg)}", *shown]))[:250]


def record_config(run: TrackedRun, cfg: DictConfig) -> None:
    """Config as params; provenance and sweep membership as tags; the config files as artifacts.

    Secrets stay out (``tracking.redact``): ``TrackedRun`` redacts params and tags, and the
    config files Hydra wrote into the output folder are redacted in place before upload.
    """
    from transferlab.tracking import provenance
    from transferlab.tracking.params import flatten
    from transferlab.tracking.redact import redact_files, redact_logging

    redact_logging()
    run.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
    overrides = task_overrides()
    job_num = sweep_job_num()
    tags = {
        **provenance.git_state(Path(__file__).parents[1]),
        # In a sweep, the command that runs this job alone.
        "command": provenance.command_line(overrides if job_num is not None else None),
        "overrides": " ".join(overrides) or "(none)",
        "output_dir": cfg.paths.output_dir,
        "finetune": finetune_label(cfg),
        **{f"version.{k}": v for k, v in provenance.package_versions().items()},
    }
    if job_num is not None:
        tags["sweep.job_num"] = job_num
    if cfg.get("reproduces"):
        tags["reproduces"] = cfg.reproduces
    run.set_tags(tags)
    hydra_dir = Path(cfg.paths.output_dir) / ".hydra"
    if hydra_dir.is_dir():
        redact_files(hydra_dir, *hydra_sweep_files())
        run.log_artifact(hydra_dir, "config")


def hydra_sweep_files() -> list[Path]:
    """The sweep's own config file (``multirun.yaml``), in a sweep job."""
    from hydra.core.hydra_config import HydraConfig

    if sweep_job_num() is None:
        return []
    sweep_file = Path(HydraConfig.get().sweep.dir) / "multirun.yaml"
    return [sweep_file] if sweep_file.is_file() else []


def record_setup(run: TrackedRun, datamodule: Any, network: Any) -> None:
    """What the data and the network turned out to be."""
    run.set_tags(
        {"data.fingerprint": datamodule.fingerprint(), "data.summary": datamodule.summary()}
    )
    total = sum(p.numel() for p in network.parameters())
    run.log_params({"model.params_total": str(total)})


def report_speed(settings: Mapping[str, Setting], run: TrackedRun | None) -> None:
    """Print the speed settings chosen for this machine, and tag the run with them."""
    from transferlab.machine import cpu, setting_lines, setting_tags

    print("\n".join([f"Speed settings on {cpu().describe()}:", *setting_lines(settings)]))
    if run is not None:
        run.set_tags({"machine.cpu": cpu().describe(), **setting_tags(settings)})


def record_results(
    run: TrackedRun,
    cfg: DictConfig,
    task: Task,
    module: Any,
    datamodule: Any,
    best_path: str | None,
) -> None:
    """The learning curves, the task's test report, the best checkpoint as an artifact and
    as an MLflow Model."""
    from transferlab.reports.curves import log_learning_curves

    log_learning_curves(run, cfg.monitor, cfg.mode, title=f"{cfg.model.name}-{finetune_label(cfg)}")
    task.report(run, cfg, module, datamodule)
    if best_path and cfg.tracking.get("log_checkpoint", True):
        run.log_artifact(best_path, "checkpoints")
    if best_path and cfg.tracking.get("log_model", True):
        record_model(run, cfg, task, datamodule, Path(best_path))


def record_model(
    run: TrackedRun, cfg: DictConfig, task: Task, datamodule: Any, best_path: Path
) -> None:
    """The best checkpoint as the MLflow Model ``runs:/<run id>/model`` (the tasks with a
    pyfunc model: ``tracking.model.SUPPORTED_TASKS``).

    A model that cannot be logged is one warning line, not a failed run: the run's results
    are recorded already.
    """
    from transferlab.tracking.model import MODEL_NAME, SUPPORTED_TASKS, log_model
    from transferlab.tracking.redact import warn_failed

    if task.name not in SUPPORTED_TASKS:
        print(f"No MLflow model logged: task={task.name} runs are not supported yet", flush=True)
        return
    try:
        seconds = log_model(run.run_id, Path(cfg.paths.output_dir), best_path, datamodule)
    except Exception as err:  # a bug or an odd environment must not fail a trained run
        warn_failed("the best model was not logged as an MLflow Model", err)
        return
    run.log_metrics({"time/log_model_s": seconds})
    print(f"MLflow model: runs:/{run.run_id}/{MODEL_NAME} (logged in {seconds:.1f} s)", flush=True)
