"""``transferlab eval run=<run> [data=...] [shift=corruptions]``: test a trained run again, on
its own test split or another data set's, clean or under the corruption suite.

The network, its best weights and its preprocessing come from the run (``inference``);
``data=<option>`` and ``data.<key>=<value>`` replace or change the run's data config
(another folder, another data set, another image size), ``shift=`` and ``shift.<key>=``
choose the corruption suite (``conf/shift/``). The results go to a new MLflow run nested
under the trained one (tag ``evaluates``), never into the trained run's own metrics.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.errors import UserError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from transferlab.inference import TrainedModel

USAGE = """\
usage: transferlab eval run=<run id | run folder | checkpoint> [data=<option>]
                        [data.<key>=<value> ...] [shift=none | corruptions]
                        [shift.<key>=<value> ...] [store_dir=mlruns]

Evaluate a trained run's best checkpoint on the test split of its own data, or of other
data, with the run's own preprocessing; the results are a new MLflow run nested under the
trained one (tagged evaluates=<run id>).

  data=image_folder data.root=DIR   another data set (any option of conf/data/)
  data.image_size=96                the run's data at another image size
  shift=corruptions                 also under the corruption suite: a table per
                                    corruption and severity, a chart, the mean and the
                                    relative drop from clean
  shift.corruptions=[gaussian_noise,contrast] shift.severities=[1,3,5] shift.limit=1000
"""
GROUPS = ("data", "shift")
DEFAULTS: dict[str, str | None] = {"run": None, "store_dir": "mlruns"}


def main(argv: list[str]) -> int:
    from transferlab.cli import key_value_args
    from transferlab.robustness import ShiftPlan, shift_options

    plain, groups = split_group_args(argv)
    args = key_value_args(plain, DEFAULTS, USAGE)
    if args is None:
        return 0
    threads = plan_threads()  # before torch loads
    from transferlab.inference import load_trained

    trained = load_trained(args["run"], args["store_dir"])
    cfg = eval_config(trained.cfg, groups)
    ShiftPlan.from_config(shift_options(cfg), cfg.seed)  # a bad corruption name: now
    evaluate(trained, cfg, groups, args["store_dir"], threads)
    return 0


def split_group_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the command's own ``key=value`` arguments, the ``data``/``shift`` overrides)."""
    own, groups = [], []
    for arg in argv:
        key = arg.partition("=")[0]
        (groups if key.split(".")[0] in GROUPS and "=" in arg else own).append(arg)
    return own, groups


def eval_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The run's config with the ``data``/``shift`` overrides applied, in order: ``group=opt``
    replaces the group by that option's file, ``group.key=value`` changes one key."""
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from transferlab.configs import option_values

    with open_dict(cfg):
        cfg.shift = option_values("shift", "none")
        cfg.calibrate = False  # a temperature fitted on other data's validation split: no
        for override in overrides:
            key, _, value = override.partition("=")
            if "." not in key:
                cfg[key] = option_values(key, value)
                continue
            try:
                change = OmegaConf.from_dotlist([override])
            except OmegaConfBaseException as err:
                raise UserError(f"{override}: {str(err).splitlines()[0]}") from None
            cfg.merge_with(change)
    return cfg


def plan_threads() -> Any:
    from transferlab.machine import plan_threads as plan

    return plan(None, None)


def evaluate(
    trained: TrainedModel, cfg: DictConfig, overrides: list[str], store_dir: str, threads: Any
) -> None:
    """Build the data, test the run's network on it, run the suite, record a new run."""
    import pytorch_lightning as pl
    import torch

    from transferlab.robustness import evaluate_shift
    from transferlab.train import print_summary

    if threads["threads"].value:
        torch.set_num_threads(threads["threads"].value)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    task = trained.task
    datamodule = task.build_datamodule(cfg)
    check_classes(trained, datamodule, overrides)
    module = evaluation_module(trained, datamodule, cfg)
    described = " ".join(overrides) or "its own test split"
    with evaluation_run(trained, cfg, store_dir, overrides) as run:
        if run is not None:
            run.log_params(evaluation_params(cfg))
        print(f"Evaluating {trained.checkpoint} on {described}", flush=True)
        trainer = pl.Trainer(
            accelerator=cfg.trainer.get("accelerator", "auto"),
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            default_root_dir=str(Path(cfg.paths.output_dir)),
        )
        started = time.perf_counter()
        results = trainer.test(module, datamodule=datamodule, verbose=False)
        clean = {k: float(v) for k, v in results[0].items()} if results else {}
        timings = {"time/test_s": time.perf_counter() - started}
        if run is not None:
            run.log_metrics({**clean, **timings})
            task.report(run, cfg, module, datamodule)
        started = time.perf_counter()
        name = f"{cfg.model.name}-{trained_label(trained)}"
        shifted = evaluate_shift(
            run, cfg, task, module, datamodule, clean, f"{name}: {described} under corruptions"
        )
        if shifted is not None:
            timings["time/shift_s"] = time.perf_counter() - started
            if run is not None:
                run.log_metrics({"time/shift_s": timings["time/shift_s"]})
        summary = {**clean, **(shifted.metrics() if shifted else {}), **timings}
        print_summary(summary, run, cfg)


def check_classes(trained: TrainedModel, datamodule: Any, overrides: list[str]) -> None:
    """The data's classes must be the run's: the same number, by index (names may differ
    when only their spelling does, e.g. a folder per class named otherwise)."""
    learned, found = tuple(trained.class_names), tuple(datamodule.class_names)
    if len(found) != len(learned):
        data = " ".join(overrides) or "its data"
        raise UserError(
            f"{data} has {len(found)} classes ({', '.join(found[:5])}...), the run learned "
            f"{len(learned)} ({', '.join(learned[:5])}...): evaluate on data with the run's classes"
        )
    if found != learned:
        pairs = ", ".join(f"{a}->{b}" for a, b in zip(found, learned, strict=True) if a != b)
        print(f"note: the data's class names differ from the run's; matched by index: {pairs}")


def evaluation_module(trained: TrainedModel, datamodule: Any, cfg: DictConfig) -> Any:
    """The run's network in a ``TransferModule`` that tests as training did: the task's
    metrics and loss, the run's memory format and inference precision on this machine."""
    from transferlab.module import TransferModule
    from transferlab.runtime import Runtime, device_type_of

    device_type = device_type_of(cfg.trainer.get("accelerator", "auto"))
    runtime, _ = Runtime.from_config(cfg.trainer).resolve(device_type)
    return TransferModule(
        trained.network,
        num_classes=len(trained.class_names),
        optimizer=None,  # type: ignore[arg-type]  # never trained
        class_names=list(trained.class_names),
        runtime=runtime,
        task=trained.task,
        criterion=trained.task.criterion(cfg),
    )


def trained_label(trained: TrainedModel) -> str:
    from transferlab.tracking.record import finetune_label

    return finetune_label(trained.cfg)


def evaluation_run(trained: TrainedModel, cfg: DictConfig, store_dir: str, overrides: list[str]):
    """A new MLflow run for this evaluation, nested under the trained run when the store
    has it; None when the trained run was not tracked and names no store."""
    import contextlib

    import mlflow

    from transferlab.tracking import ensure_experiment, start_run
    from transferlab.tracking.store import resolve_tracking_uri

    if not cfg.tracking.get("enabled", True):
        return contextlib.nullcontext(None)
    uri = resolve_tracking_uri(
        cfg.tracking.get("uri"), store_dir, cfg.tracking.get("server", False)
    )
    client = mlflow.MlflowClient(uri)
    source = existing_run(client, trained.run_id)
    if source is not None:
        experiment_id = source.info.experiment_id
    else:
        experiment_id = ensure_experiment(cfg.tracking.experiment_name, uri)
    name = f"eval {cfg.model.name}-{trained_label(trained)} {' '.join(overrides)}".strip()
    tags = {
        "evaluates": trained.run_id or str(trained.checkpoint),
        "eval.checkpoint": str(trained.checkpoint),
        "eval.overrides": " ".join(overrides) or "(none)",
        "task": trained.task.name,
        "task.compare_metrics": ",".join(trained.task.compare_metrics),
        "finetune": trained_label(trained),
    }
    parent = source.info.run_id if source is not None else None
    return start_run(uri, experiment_id, name[:250], tags=tags, parent_run_id=parent)


def existing_run(client: Any, run_id: str | None) -> Any:
    from mlflow.exceptions import MlflowException

    if run_id is None:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def evaluation_params(cfg: DictConfig) -> dict[str, str]:
    """What this evaluation used: its data, shift, model and seed, as MLflow params."""
    from omegaconf import OmegaConf

    from transferlab.tracking.params import flatten

    plain = OmegaConf.to_container(cfg, resolve=True)
    return flatten({key: plain[key] for key in ("data", "shift", "model", "seed") if key in plain})
