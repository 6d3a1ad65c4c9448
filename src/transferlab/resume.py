"""``transferlab train resume=<run id | run folder>``: continue a stopped run into the same
MLflow run, from the checkpoint its last finished epoch left (``checkpoints/last.ckpt``).

The command is rewritten before Hydra composes anything: the run's own overrides (from
its ``.hydra/overrides.yaml``), the run's folder as ``hydra.run.dir``, and only the changes
in :data:`SAFE_CHANGES`. Lightning restores the weights, the optimizer, the schedule, the
epoch and the callbacks' state (the freezing phase, the best checkpoint, early stopping);
each epoch's shuffle and random state follow from (seed, epoch) alone
(``EpochSeed``, ``EpochShuffleSampler``), so the resumed run continues exactly as the
uninterrupted one would have. Steps logged before the stop are not logged again.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferlab.errors import UserError

RUN_FILE = "run.json"  # in a run's output folder: which MLflow run it records into
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# What may change when a run resumes: how long it trains and how it shows progress.
SAFE_CHANGES = (
    "trainer.max_epochs",
    "trainer.devices",  # a DDP run continues on one process (trainer.devices=1)
    "num_threads",
    "trainer.enable_progress_bar",
    "callbacks.progress_bar.refresh_rate",
)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def override_key(override: str) -> str:
    """``+a.b=1`` -> ``a.b`` (the key a Hydra override sets, adds or deletes)."""
    return override.split("=", 1)[0].lstrip("+~")


def write_run_file(output_dir: str | os.PathLike, run_id: str, experiment_id: str) -> None:
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_FILE).write_text(
        json.dumps({"run_id": run_id, "experiment_id": experiment_id}, indent=2) + "\n"
    )


def run_folder(
    target: str, store_dir: str | os.PathLike = "mlruns", label: str | None = None
) -> tuple[Path, str]:
    """The output folder and MLflow run id ``target`` (a run folder or a run id) names.

    ``label`` starts the error messages (default ``resume=<target>``).
    """
    label = label or f"resume={target}"
    folder = Path(target).expanduser()
    if folder.is_dir():
        info = folder / RUN_FILE
        if not info.is_file():
            raise UserError(
                f"{label}: {folder} has no {RUN_FILE}; pass the folder of a tracked run "
                "(outputs/train/<date>/<time>)"
            )
        return folder.resolve(), json.loads(info.read_text())["run_id"]
    if not RUN_ID.match(target):
        raise UserError(f"{label}: not a run folder, nor a 32-character MLflow run id")
    return run_id_folder(target, store_dir, label), target


def run_id_folder(run_id: str, store_dir: str | os.PathLike, label: str) -> Path:
    """The output folder of MLflow run ``run_id`` (its ``output_dir`` tag), which must exist."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from transferlab.tracking.redact import redact_uri
    from transferlab.tracking.store import existing_store_uri

    uri = existing_store_uri(store_dir)
    try:
        run = mlflow.MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise UserError(
            f"{label}: no such run in {redact_uri(uri)}; run from the folder you trained "
            "in, or pass the run's folder instead"
        ) from None
    output_dir = run.data.tags.get("output_dir")
    if not output_dir or not Path(output_dir).is_dir():
        raise UserError(f"{label}: its output folder {output_dir} is gone")
    return Path(output_dir)


def recorded_overrides(folder: Path, drop: Sequence[str] = ()) -> list[str]:
    """The overrides a run was started with (``.hydra/overrides.yaml``), but the keys in ``drop``."""
    from omegaconf import OmegaConf

    saved = folder / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise UserError(f"{saved} is missing: it holds the run's config")
    return [str(o) for o in OmegaConf.load(saved) if override_key(str(o)) not in drop]


def resume_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``resume=X`` replaced by the run's own overrides and folder."""
    targets = [arg for arg in argv if arg.startswith("resume=")]
    if not targets or targets[-1] == "resume=null":
        return list(argv)
    if any(arg in ("-m", "--multirun") for arg in argv):
        raise UserError("resume= continues one run: leave out -m")
    folder, run_id = run_folder(targets[-1].split("=", 1)[1])
    original = recorded_overrides(folder, drop=("hydra.run.dir", "resume"))
    changes = [arg for arg in argv if not arg.startswith("resume=")]
    for arg in changes:
        if arg.startswith("-") or override_key(arg) not in SAFE_CHANGES:
            raise UserError(
                f"resume continues a run with its own config: {arg!r} cannot change; "
                f"what may: {', '.join(SAFE_CHANGES)}"
            )
    changed = {override_key(arg) for arg in changes}
    kept = [o for o in original if override_key(o) not in changed]
    return [*kept, *changes, f"hydra.run.dir={folder}", f"resume='{run_id}'"]


def requeued_run(output_dir: str | os.PathLike) -> str | None:
    """The run to continue when SLURM restarts a pre-empted job (``SLURM_RESTART_COUNT``).

    submitit requeues a pre-empted job with the same arguments (Hydra's submitit launcher
    passes its ``checkpoint`` hook), so the job starts again in the same output folder:
    if a tracked run left its run file and last checkpoint there, the job continues it.
    """
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None
    folder = Path(output_dir)
    if not (folder / RUN_FILE).is_file() or not (folder / LAST_CHECKPOINT).is_file():
        return None
    return str(json.loads((folder / RUN_FILE).read_text())["run_id"])


@dataclass
class ResumePoint:
    run_id: str
    checkpoint: Path
    epoch: int  # the first epoch the resumed run trains


def next_epoch(checkpoint: Path) -> int:
    """The epoch Lightning continues with from ``checkpoint`` (one of our own runs)."""
    import torch

    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"cannot read the checkpoint {checkpoint}: {err}") from None
    try:
        return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(state.get("epoch", -1)) + 1


def resume_point(cfg: Any, client: Any) -> ResumePoint:
    """Check that run ``cfg.resume`` can continue from this config; where from."""
    from transferlab.tracking.liveness import HOST, PID, STARTED, is_alive

    run_id = str(cfg.resume)
    run = client.get_run(run_id)
    tags = run.data.tags
    if run.info.status == "FINISHED":
        raise UserError(f"run {run_id} finished: there is nothing to resume")
    here = PID in tags and tags.get(HOST) == socket.gethostname()
    if run.info.status == "RUNNING" and here and is_alive(int(tags[PID]), tags.get(STARTED, "")):
        raise UserError(f"run {run_id} is still running (process {tags[PID]})")
    checkpoint = Path(cfg.paths.output_dir) / LAST_CHECKPOINT
    if not checkpoint.is_file():
        raise UserError(
            f"run {run_id} stopped before its first epoch ended ({checkpoint} does not "
            "exist): start it again instead"
        )
    check_same_config(cfg, run.data.params)
    return ResumePoint(run_id, checkpoint, next_epoch(checkpoint))


def check_same_config(cfg: Any, params: Mapping[str, str]) -> None:
    """The config must be the run's own, except :data:`SAFE_CHANGES` (e.g. after an upgrade
    changed a default, the resumed run would not be the same experiment)."""
    from omegaconf import OmegaConf

    from transferlab.tracking.params import flatten

    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    ignored = (*SAFE_CHANGES, "resume", "paths.root")
    for key, value in now.items():
        if key in ignored or key.startswith("tracking.") or key not in params:
            continue
        if params[key] != value:
            raise UserError(
                f"resume: {key} was {params[key]!r} in the run and is {value!r} now "
                "(a changed default?): resume with the version that started it, or start "
                "a new run"
            )
