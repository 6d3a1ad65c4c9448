"""A thin MLflow layer: the store, one run per job, what a run records.

``TrackedRun`` and ``start_run`` load on first use: they bring in Lightning, hence torch,
which must not load before a run has chosen its OpenMP settings (transferlab.machine).
"""

from typing import Any

from transferlab.tracking.store import default_store_uri, ensure_experiment

__all__ = ["TrackedRun", "default_store_uri", "ensure_experiment", "start_run"]


def __getattr__(name: str) -> Any:
    if name in ("TrackedRun", "start_run"):
        from transferlab.tracking import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
