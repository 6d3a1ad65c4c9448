"""A trained module's test metrics under domain shift: the corruption suite (``shift=``).

Each corruption of ``transferlab.shift`` at each severity is one pass over the test split
(or its first ``limit`` images), the corruption applied after resizing and before
normalisation, deterministic for the seed. The same function serves ``transferlab train
shift=corruptions`` (after the test, into the training run) and ``transferlab eval
shift=corruptions`` (into a new run linked to the trained one).

Metrics in MLflow: ``shift/<corruption>/<metric>`` with the severity as step (MLflow
charts it against severity), ``shift/mean/<metric>`` (mean over every corruption and
severity: for accuracy, the mean corruption accuracy) and ``shift/relative_drop/<metric>``
(``1 - mean / clean``). Artifacts: ``shift/corruptions.csv``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from transferlab.errors import UserError

if TYPE_CHECKING:
    from transferlab.tasks import Task
    from transferlab.tracking import TrackedRun

SHIFT_OPTIONS = ("name", "corruptions", "severities", "limit", "seed")


@dataclass(frozen=True)
class ShiftPlan:
    """Which corruptions, at which severities, on how many test images, with which seed."""

    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    limit: int | None
    seed: int

    @classmethod
    def from_config(cls, shift: Mapping[str, Any] | None, seed: int) -> ShiftPlan | None:
        """The plan of a ``shift`` config group (None for ``shift=none``), checked."""
        options = dict(shift or {})
        unknown = sorted(set(options) - set(SHIFT_OPTIONS))
        if unknown:
            raise UserError(
                f"shift has no option(s) {', '.join(unknown)}; known: {', '.join(SHIFT_OPTIONS)}"
            )
        name = str(options.get("name", "none"))
        if name == "none":
            return None
        if name != "corruptions":
            raise UserError(f"shift={name} is not a shift suite; choose shift=none or corruptions")
        from transferlab import shift as suite

        names = options.get("corruptions") or suite.CORRUPTIONS
        if isinstance(names, str):
            names = [n for n in names.split(",") if n]
        severities = options.get("severities") or (1, 2, 3, 4, 5)
        if isinstance(severities, (str, int)):
            severities = [s for s in str(severities).split(",") if s]
        limit = options.get("limit")
        if limit is not None and (not str(limit).isdigit() or int(limit) < 1):
            raise UserError(f"shift.limit={limit} must be a positive number of test images")
        return cls(
            tuple(suite.check_corruptions(list(names))),
            tuple(suite.check_severities(list(severities))),
            int(limit) if limit is not None else None,
            int(options["seed"]) if options.get("seed") is not None else int(seed),
        )


@dataclass
class ShiftResults:
    """Metrics on clean and corrupted test images: ``shifted[corruption][severity][metric]``."""

    plan: ShiftPlan
    metric: str  # the headline metric's name without its split, e.g. ``acc`` or ``miou``
    clean: dict[str, float]
    shifted: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)

    def value(self, corruption: str, severity: int) -> float:
        return self.shifted[corruption][severity][self.metric]

    def corruption_mean(self, corruption: str) -> float:
        return mean(self.value(corruption, s) for s in self.plan.severities)

    def severity_mean(self, severity: int) -> float:
        return mean(self.value(c, severity) for c in self.shifted)

    @property
    def mean(self) -> float:
        """The headline metric over every corruption and severity."""
        return mean(self.value(c, s) for c in self.shifted for s in self.plan.severities)

    @property
    def relative_drop(self) -> float:
        """How much of the clean value is lost under shift, on average (0: none)."""
        clean = self.clean[self.metric]
        return 1.0 - self.mean / clean if clean else math.nan

    def metrics(self) -> dict[str, float]:
        """The summary metrics (the per-corruption curves are logged with steps)."""
        return {
            f"shift/mean/{self.metric}": self.mean,
            f"shift/relative_drop/{self.metric}": self.relative_drop,
        }


def mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def headline_metric(task: Task) -> str:
    """The task's first comparison metric without its split: ``test/acc`` -> ``acc``."""
    return task.compare_metrics[0].split("/", 1)[1]


def split_metrics(module: Any, task: Task, dataset: Any, datamodule: Any) -> dict[str, float]:
    """The task's metrics over ``dataset`` (no prefix), through the task's
    ``evaluation_step`` as in testing (the module's eval precision and memory format), in
    the data module's eval batches, without Lightning."""
    import torch
    from torch.utils.data import DataLoader

    from transferlab.module import metric_updates

    metrics = task.metrics(module.hparams.num_classes).to(module.device)
    module.eval()
    loader = DataLoader(
        dataset, batch_size=batch_size(datamodule), collate_fn=datamodule.collate_fn
    )
    with torch.inference_mode():
        for batch in loader:
            batch = module.transfer_batch_to_device(batch, module.device, 0)
            step = task.evaluation_step(module, batch)
            with metric_updates(module.device):
                metrics.update(step.outputs, batch[task.target])
    return {name: float(value) for name, value in metrics.compute().items()}


def run_suite(
    module: Any,
    task: Task,
    datamodule: Any,
    plan: ShiftPlan,
    clean: Mapping[str, float],
) -> ShiftResults:
    """Every corruption of ``plan`` at every severity, one pass each, with a progress bar.

    ``clean`` holds the test metrics without corruption (``test/acc`` or ``acc`` keys).
    """
    from tqdm.auto import tqdm

    plan = for_task(plan, task)
    metric = headline_metric(task)
    clean = {key.removeprefix("test/"): float(value) for key, value in clean.items()}
    if plan.limit is not None:  # the clean value on the same images
        clean = split_metrics(module, task, limited(datamodule.test_set, plan.limit), datamodule)
    results = ShiftResults(plan, metric, clean)
    passes = [(c, s) for c in plan.corruptions for s in plan.severities]
    images = len(limited(datamodule.test_set, plan.limit))
    print(
        f"Corruption suite: {len(plan.corruptions)} corruptions x {len(plan.severities)} "
        f"severities on {images} test images (seed {plan.seed})",
        flush=True,
    )
    with tqdm(passes, desc="shift", unit="pass") as progress:
        for corruption, severity in progress:
            progress.set_postfix_str(f"{corruption} {severity}")
            dataset = task.shifted_test_set(datamodule, corruption, severity, plan.seed)
            scores = split_metrics(module, task, limited(dataset, plan.limit), datamodule)
            results.shifted.setdefault(corruption, {})[severity] = scores
    return results


def for_task(plan: ShiftPlan, task: Task) -> ShiftPlan:
    """``plan`` without the geometric corruptions when the task's targets are per pixel."""
    from dataclasses import replace

    from transferlab.shift import GEOMETRIC

    if not task.spatial_targets:
        return plan
    kept = tuple(c for c in plan.corruptions if c not in GEOMETRIC)
    left_out = [c for c in plan.corruptions if c in GEOMETRIC]
    if left_out:
        print(
            f"task={task.name}: {', '.join(left_out)} left out (they move pixels off their labels)"
        )
    if not kept:
        raise UserError(
            f"shift.corruptions has only geometric corruptions, none for task={task.name}"
        )
    return replace(plan, corruptions=kept)


def batch_size(datamodule: Any) -> int:
    return int(datamodule.eval_batch_size)


def limited(dataset: Any, limit: int | None) -> Any:
    """The first ``limit`` samples of ``dataset`` (all of them for None)."""
    from torch.utils.data import Subset

    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, range(limit))


def record_shift(run: TrackedRun | None, results: ShiftResults, title: str) -> str:
    """Print the table; log the curves, summary metrics, table and chart to ``run``."""
    import matplotlib.pyplot as plt

    from transferlab.reports.shift import shift_csv, shift_figure, shift_markdown

    table = shift_markdown(results)
    print(f"\n{title}\n{table}", flush=True)
    if run is None:
        return table
    metric = results.metric
    for corruption, by_severity in results.shifted.items():
        for severity, scores in by_severity.items():
            run.log_metrics({f"shift/{corruption}/{metric}": scores[metric]}, step=severity)
    run.log_metrics(results.metrics())
    run.log_text(table, "shift/corruptions.md")
    run.log_text(shift_csv(results), "shift/corruptions.csv")
    figure = shift_figure(results, title)
    run.log_figure(figure, "shift/corruptions.png")
    plt.close(figure)
    return table


def evaluate_shift(
    run: TrackedRun | None,
    cfg: Any,
    task: Task,
    module: Any,
    datamodule: Any,
    clean: Mapping[str, float],
    title: str,
) -> ShiftResults | None:
    """The corruption suite of ``cfg.shift`` (nothing for ``shift=none``), recorded."""
    plan = ShiftPlan.from_config(shift_options(cfg), cfg.seed)
    if plan is None:
        return None
    results = run_suite(module, task, datamodule, plan, clean)
    record_shift(run, results, title)
    return results


def shift_options(cfg: Any) -> dict[str, Any] | None:
    from omegaconf import OmegaConf

    shift = cfg.get("shift")
    return OmegaConf.to_container(shift, resolve=True) if shift is not None else None
