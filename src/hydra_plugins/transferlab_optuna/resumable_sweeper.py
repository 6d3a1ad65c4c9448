"""Optuna TPE through Hydra, resumable: ``n_trials`` is the size of the whole study.

Hydra's Optuna sweeper runs ``n_trials`` new trials on every call, so running an
interrupted search again would overshoot its budget. This one first counts the trials the
stored study already finished and runs only the rest: the same command resumes an
interrupted search, and a larger ``hydra.sweeper.n_trials`` extends a finished one. Trials
left RUNNING by an interrupted call are marked FAIL (one search process per study).
The optimisation direction follows the run's ``mode`` (max: maximize). A resumed search
reseeds its sampler, so it is not bit-for-bit reproducible.

Kept light at import: Hydra imports this module on every start to discover plugins.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

log = logging.getLogger(__name__)


def sqlite_path(storage: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(storage[len(prefix) :]) if storage.startswith(prefix) else None


def finished_trials(storage: str, study_name: str) -> int:
    """Trials of the stored study that ran to an end; stale RUNNING ones are marked FAIL."""
    import optuna
    from optuna.trial import TrialState

    path = sqlite_path(storage)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study yet
        return 0
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)
            log.warning(f"Trial {trial.number} was left running by an interrupted search: FAIL")
    return sum(trial.state in done for trial in trials)


class ResumableOptunaSweeper(OptunaSweeper):
    """Hydra's Optuna sweeper, counting ``n_trials`` over the whole stored study."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target_trials = int(kwargs["n_trials"])

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        mode = impl.config.get("mode")
        if mode in ("max", "min"):
            impl.direction = "maximize" if mode == "max" else "minimize"
        done = 0
        if impl.storage and impl.study_name:
            done = finished_trials(str(impl.storage), str(impl.study_name))
        remaining = self.target_trials - done
        if remaining <= 0:
            print(
                f"Study {impl.study_name!r} already has {done} of n_trials="
                f"{self.target_trials} trials: nothing to run. To add trials, raise "
                "hydra.sweeper.n_trials.",
                flush=True,
            )
            return None
        if done:
            print(f"Resuming study {impl.study_name!r}: {done} trials done, {remaining} to go.")
            # A sampler re-created with the same seed would replay the first call's
            # random start-up points; draw fresh ones instead.
            impl.sampler.reseed_rng()
        impl.n_trials = remaining
        try:
            return impl.sweep(arguments)
        except ValueError as err:
            if "No trials are completed" not in str(err):
                raise
            log.error(f"Study {impl.study_name!r}: every trial failed (see the errors above).")
            return None
