"""A thin MLflow layer: the store, one run per job, what a run records."""

from transferlab.tracking.run import TrackedRun, start_run
from transferlab.tracking.store import default_store_uri, ensure_experiment

__all__ = ["TrackedRun", "default_store_uri", "ensure_experiment", "start_run"]
