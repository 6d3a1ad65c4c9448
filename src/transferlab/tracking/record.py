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


NAME_SEPARATOR = " · "


def run_name(cfg: DictConfig, overrides: list[str]) -> str:
    """``tracking.run_name``, else a name a person tells apart in MLflow's table: in a sweep,
    what varies between its jobs first (``lr=1e-3 · lite0 · linear_probe``), then the model
    and the strategy, then the job's other overrides; floats written compactly."""
    if cfg.tracking.get("run_name"):
        return str(cfg.tracking.run_name)
    from transferlab.tracking.redact import redact_text

    swept = swept_keys()
    pairs = [o.split("=", 1) for o in overrides if "=" in o and not o.startswith("hydra.")]
    varying = [(key, value) for key, value in pairs if key.lstrip("+~") in swept]
    rest = [
        (key, value)
        for key, value in pairs
        if key.lstrip("+~") not in swept and key not in ("model", "finetune")
    ]
    parts = [short_override(key, value) for key, value in varying]
    for group, label in (("model", short_model(cfg)), ("finetune", finetune_label(cfg))):
        if group not in swept:
            parts.append(label)
    parts += [short_override(key, value) for key, value in rest]
    return redact_text(NAME_SEPARATOR.join(parts))[:250]


def short_override(key: str, value: str) -> str:
    """``optimizer.lr=0.001`` -> ``lr=1e-3``; a config group's choice is its value alone."""
    key = key.lstrip("+~")
    if key in ("model", "finetune", "data", "task", "detector", "optimizer", "scheduler"):
        return value
    return f"{key.rsplit('.', 1)[-1]}={compact(value)}"


def compact(value: str) -> str:
    """A number written short: 0.001 -> 1e-3, 1000000000000.0 -> 1e12, 0.30 -> 0.3; other
    text unchanged."""
    try:
        number = float(value)
    except ValueError:
        return value
    if number == 0 or 1e-2 <= abs(number) < 1e4:
        return f"{number:.4g}"
    mantissa, exponent = f"{number:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def short_model(cfg: DictConfig) -> str:
    """The ``model=`` choice (or ``model.name``), EfficientNet-Lite as ``lite0``."""
    from hydra.core.hydra_config import HydraConfig

    name = str(cfg.model.name)
    if HydraConfig.initialized():
        name = str(HydraConfig.get().runtime.choices.get("model") or name)
    return name.removeprefix("tf_").replace("efficientnet_lite", "lite")


def swept_keys() -> set[str]:
    """The keys a Hydra multirun varies: the sweeper's ``params`` and the command line's
    sweep overrides (``a=1,2``, ``range(...)``, ...); empty outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if sweep_job_num() is None:
        return set()
    hydra = HydraConfig.get()
    sweep_file = Path(hydra.sweep.dir) / "multirun.yaml"
    typed: list[str] = []
    if sweep_file.is_file():
        typed = [str(o) for o in OmegaConf.load(sweep_file).hydra.overrides.task]
    params = hydra.sweeper.get("params") or {}
    typed += [f"{key}={value}" for key, value in params.items()]
    try:
        parsed = OverridesParser.create().parse_overrides(typed)
    except Exception:  # an override only the sweeper understands: no name is worth a failure
        return set(params)
    return {o.key_or_group for o in parsed if o.is_sweep_override()} | set(params)


def record_config(run: TrackedRun, cfg: DictConfig) -> None:
    """What describes the experiment as params (``experiment_params``); provenance, the
    output folder and sweep membership as tags; the whole config's files as artifacts.

    Secrets stay out (``tracking.redact``): ``TrackedRun`` redacts params and tags, and the
    config files Hydra wrote into the output folder are redacted in place before upload.
    """
    from transferlab.tracking import provenance
    from transferlab.tracking.params import experiment_params
    from transferlab.tracking.redact import redact_files, redact_logging

    redact_logging()
    run.log_params(experiment_params(OmegaConf.to_container(cfg, resolve=True)))
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
    if not hydra_dir.is_dir():  # run() called from Python: the config as Hydra would save it
        hydra_dir.mkdir(parents=True)
        (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
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
    """What the data and the network turned out to be: the data's fingerprint and summary
    as tags and as the run's dataset (MLflow's Dataset column), the parameter count."""
    summary = ", ".join(f"{key}={value}" for key, value in datamodule.summary().items())
    run.set_tags({"data.fingerprint": datamodule.fingerprint(), "data.summary": summary})
    run.log_dataset(
        name=str(datamodule.source),
        digest=datamodule.fingerprint(),
        source={"source": str(datamodule.source), "root": str(getattr(datamodule, "root", None))},
        tags={"summary": summary},
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
    from transferlab.reports.curves import LEARNING_CURVES, log_learning_curves

    run.compare_figures.update({LEARNING_CURVES, *task.compare_figures})
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
    pyfunc model: ``Task.serving_model``).

    A model that cannot be logged is one warning line, not a failed run: the run's results
    are recorded already.
    """
    from transferlab.tracking.model import MODEL_NAME, log_model
    from transferlab.tracking.redact import warn_failed

    if task.serving_model is None:
        print(f"No MLflow model logged: task={task.name} runs are not supported yet", flush=True)
        return
    folder = Path(cfg.paths.output_dir)
    try:
        seconds = run.send(
            "the MLflow Model", lambda: log_model(run.run_id, folder, best_path, datamodule)
        )
    except Exception as err:  # a bug or an odd environment must not fail a trained run
        warn_failed("the best model was not logged as an MLflow Model", err)
        return
    if seconds is None:  # the tracking server went away
        return
    run.log_metrics({"time/log_model_s": seconds})
    print(f"MLflow model: runs:/{run.run_id}/{MODEL_NAME} (logged in {seconds:.1f} s)", flush=True)


def result_description(
    task: Task,
    monitor: str,
    best: float,
    test_metrics: Mapping[str, float],
    timings: Mapping[str, float],
) -> str:
    """The run's key result in one line, for its MLflow description: the task's first two
    test metrics, the best monitored value and the fit time."""
    shown = [f"{name} {test_metrics[name]:.4f}" for name in task.compare_metrics[:2]
             if name in test_metrics]  # fmt: skip
    shown.append(f"best {monitor} {best:.4f}")
    if "time/fit_s" in timings:
        shown.append(f"fit {timings['time/fit_s']:.0f} s")
    return " · ".join(shown)
