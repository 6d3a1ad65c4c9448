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
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


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
    shown = [o for o in overrides if not o.startswith(("model=", "hydra."))]
    return " ".join([f"{cfg.model.name}-{finetune_label(cfg)}", *shown])[:250]


def record_config(run: TrackedRun, cfg: DictConfig) -> None:
    """Config as params; provenance and sweep membership as tags; the config files as artifacts."""
    from transferlab.tracking import provenance
    from transferlab.tracking.params import flatten

    run.log_params(flatten(OmegaConf.to_container(cfg, resolve=True)))
    overrides = task_overrides()
    tags = {
        **provenance.git_state(Path(__file__).parents[1]),
        "command": provenance.command_line(),
        "overrides": " ".join(overrides) or "(none)",
        "output_dir": cfg.paths.output_dir,
        "finetune": finetune_label(cfg),
        **{f"version.{k}": v for k, v in provenance.package_versions().items()},
    }
    job_num = sweep_job_num()
    if job_num is not None:
        tags["sweep.job_num"] = job_num
    run.set_tags(tags)
    hydra_dir = Path(cfg.paths.output_dir) / ".hydra"
    if hydra_dir.is_dir():
        run.log_artifact(hydra_dir, "config")


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
    """The task's test report and the best checkpoint as artifacts."""
    task.report(run, cfg, module, datamodule)
    if best_path and cfg.tracking.get("log_checkpoint", True):
        run.log_artifact(best_path, "checkpoints")
