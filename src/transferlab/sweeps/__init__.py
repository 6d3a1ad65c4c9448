"""Hydra sweeps recorded in MLflow: one parent run per sweep, one child run per job."""

from transferlab.sweeps.callback import PARENT_RUN_ENV, MlflowSweepCallback

__all__ = ["PARENT_RUN_ENV", "MlflowSweepCallback"]
