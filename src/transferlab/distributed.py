"""Data-parallel training (``trainer=ddp``): Lightning's DDP, with this job's worker processes
started here.

Lightning's own launcher re-runs ``sys.argv`` for ranks 1..N-1, which repeats a whole
Hydra multirun in every worker. Instead the job starts its workers itself, as single runs
of its own overrides in its own output folder (:class:`Workers`), and gives every process
the variables Lightning's environment reads (``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``); Lightning then sees processes created externally and
only joins them. The same code runs under any Hydra launcher, and under SLURM (or
``torchrun``), whose tasks are the ranks already.

Rank 0 alone records the run (MLflow run, checkpoints, reports); the other ranks train and
test with it, then stop (:func:`is_rank_zero` decides by the launch environment, before
torch.distributed starts).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from transferlab.finetune import FinetuneStrategy

# What Lightning's environment reads in an externally launched process.
LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
WORKER_LOG = "ddp_rank{rank}.log"
RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")  # torch's prefix of a failed rank's lines
# How long a worker may take to exit once rank 0 is done (it has finished testing by then).
WORKER_EXIT_S = 60.0
# Exit statuses of a worker stopped by SIGINT or SIGTERM (Ctrl+C reaches every rank).
STOPPED_BY_SIGNAL = (-2, -15, 130, 143)
# How long rank 0, failing, waits for a worker that may have failed first to exit.
WORKER_FAIL_S = 5.0


def processes_per_node(trainer: Mapping[str, Any]) -> int:
    """How many processes one node of this trainer runs: ``devices`` under a DDP strategy."""
    strategy = str(trainer.get("strategy", "auto"))
    if not strategy.startswith("ddp"):
        return 1
    devices = trainer.get("devices", "auto")
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if devices in ("auto", -1, "-1"):  # every GPU; one process on CPU
        if str(trainer.get("accelerator", "auto")).lower() not in ("gpu", "cuda", "auto"):
            return 1
        import torch

        return max(1, torch.cuda.device_count())
    return int(devices)


def launched_externally(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a launcher started this job's ranks already (SLURM tasks, torchrun, or this
    module's own workers)."""
    return (
        "LOCAL_RANK" in environ
        or "RANK" in environ
        or int(environ.get("SLURM_NTASKS", "1") or 1) > 1
    )


def is_rank_zero(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is global rank 0 (or no distributed job at all), as its launcher
    set it: ``RANK`` (torchrun), ``SLURM_PROCID`` in a job of several tasks, else
    ``NODE_RANK`` and ``LOCAL_RANK`` (Lightning's variables; this module's workers)."""
    if "RANK" in environ:
        return int(environ["RANK"]) == 0
    if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in environ:
        return int(environ["SLURM_PROCID"]) == 0
    return int(environ.get("NODE_RANK", 0)) == 0 and int(environ.get("LOCAL_RANK", 0)) == 0


def several_processes(trainer: Mapping[str, Any]) -> bool:
    """Whether the trainer runs DDP over more than one process (without loading torch)."""
    devices = trainer.get("devices", "auto")
    if not str(trainer.get("strategy", "auto")).startswith("ddp"):
        return False
    if int(trainer.get("num_nodes", 1)) > 1 or devices in ("auto", -1, "-1"):
        return True
    return (len(devices) if isinstance(devices, (list, tuple)) else int(devices)) > 1


def check(cfg: Mapping[str, Any]) -> None:
    """One-line errors for what DDP does not support, before anything starts."""
    trainer = cfg.get("trainer") or {}
    sync = trainer.get("sync_batchnorm", "auto")
    if sync not in ("auto", True, False):
        raise UserError(f"trainer.sync_batchnorm={sync!r} must be auto, true or false")
    if sync is True and str(trainer.get("accelerator")).lower() == "cpu":
        use_sync_batchnorm(sync, None, "cpu")  # its one-line refusal, before any process starts
    if not several_processes(trainer):
        return
    if cfg.get("resume"):
        raise UserError(
            "resume= continues a run on one process: add trainer.devices=1 (a DDP run's "
            "checkpoint is the same)"
        )


def worker_command(overrides: Sequence[str], output_dir: str, rank: int) -> list[str]:
    """Rank ``rank`` of a job: a single run of the job's ``overrides`` in its ``output_dir``,
    which writes no config of its own and logs to its own Hydra log file."""
    return [
        sys.executable, "-m", "transferlab.train", *overrides,
        f"hydra.run.dir={output_dir}", "hydra.output_subdir=null",
        f"hydra.job.name=train_rank{rank}",
    ]  # fmt: skip


class Workers:
    """Ranks 1..N-1 of one job on this node, and rank 0's launch variables in this process.

    Each worker writes its output to ``ddp_rank<r>.log`` in the job's folder. A worker that
    fails stops this process (SIGTERM), since rank 0 could wait for it in a collective, and
    the job ends with the worker's last line as its error. On the way out every worker
    still running is stopped and the variables are restored (a sweep's next job starts
    clean).
    """

    def __init__(self, overrides: Sequence[str], output_dir: str, processes: int) -> None:
        from transferlab.tracking.server import free_port

        self.folder = Path(output_dir)
        self.variables = {
            "NODE_RANK": "0",
            "WORLD_SIZE": str(processes),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
        self.commands = {
            rank: worker_command(overrides, output_dir, rank) for rank in range(1, processes)
        }
        self.procs: dict[int, subprocess.Popen] = {}
        self.failed: int | None = None
        self._saved: dict[str, str | None] = {}
        self._done = threading.Event()

    def log(self, rank: int) -> Path:
        return self.folder / WORKER_LOG.format(rank=rank)

    def __enter__(self) -> Workers:
        self._saved = {name: os.environ.get(name) for name in LAUNCH_ENV}
        os.environ.update(self.variables, LOCAL_RANK="0")
        self.folder.mkdir(parents=True, exist_ok=True)
        for rank, command in self.commands.items():
            with open(self.log(rank), "w") as log:
                env = {**os.environ, **self.variables, "LOCAL_RANK": str(rank)}
                self.procs[rank] = subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT
                )
        print(
            f"DDP: {len(self.procs) + 1} processes on this node; ranks 1-{len(self.procs)} "
            f"log to {self.log(1).name}...",
            flush=True,
        )
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def _watch(self) -> None:
        import signal

        while not self._done.wait(0.5):
            for rank, proc in self.procs.items():
                if proc.poll() not in (None, 0, *STOPPED_BY_SIGNAL):
                    self.failed = rank
                    os.kill(os.getpid(), signal.SIGTERM)  # __exit__ says why, in one line
                    return

    def last_line(self, rank: int) -> str:
        """The worker's last log line that says something (its error, when it failed)."""
        text = self.log(rank).read_text(errors="replace")
        lines = [RANK_PREFIX.sub("", line).strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else f"no output (see {self.log(rank)})"

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        # Done: the workers finish their test and exit. Failed: a worker that failed first
        # (rank 0 then fails in a collective) is exiting too; the others are stopped.
        deadline = time.monotonic() + (WORKER_EXIT_S if exc[0] is None else WORKER_FAIL_S)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        if self.failed is None:
            self.failed = next(
                (r for r, p in self.procs.items() if p.poll() not in (None, 0, *STOPPED_BY_SIGNAL)),
                None,
            )
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                if proc.poll() is None:
                    proc.kill()
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if self.failed is not None:  # the cause, instead of what it made rank 0 raise
            raise UserError(f"DDP rank {self.failed} failed: {self.last_line(self.failed)}")
        if exc[0] is None and any(p.returncode != 0 for p in self.procs.values()):
            raise UserError(f"DDP workers did not exit after the test: see {self.log(1)}")


def job_workers(cfg: Any) -> contextlib.AbstractContextManager[Any]:
    """This job's DDP workers on this node, started now (a no-op context for a single
    process, or when a launcher started the ranks)."""
    processes = processes_per_node(cfg.trainer)
    if processes == 1 or launched_externally():
        return contextlib.nullcontext()
    if int(cfg.trainer.get("num_nodes", 1)) > 1:
        raise UserError(
            "trainer.num_nodes > 1 needs a launcher that starts every node's processes: "
            "hydra/launcher=slurm_ddp (or torchrun on each node)"
        )
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # the workers re-run the job's command-line overrides
        raise UserError(
            f"trainer.devices={processes} under DDP starts from the command line "
            "(transferlab train ...), not from transferlab.train.run(cfg)"
        )
    overrides = list(HydraConfig.get().overrides.task)
    return Workers(overrides, str(cfg.paths.output_dir), processes)


# Inside a running job ---------------------------------------------------------------------
def world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(local: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """The rows of a split computed in blocks (rank r: its ``ShardSampler`` block) as one
    tensor on every rank, in the split's order."""
    import torch
    import torch.distributed as dist

    from transferlab.data.samplers import shard_bounds

    _, size = world()
    if size == 1:
        return local
    rows = -(-total // size)
    padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    shards = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(shards, padded)
    counts = [stop - start for start, stop in (shard_bounds(total, r, size) for r in range(size))]
    return torch.cat([shard[:count].cpu() for shard, count in zip(shards, counts, strict=True)])


def keep_synced_states(metrics: Sequence[Any]) -> None:
    """Replace each metric's states on every rank by their sync over all ranks, so that
    rank 0 can read and compute them after the other ranks have gone (the test report).
    A collective: every rank calls it with the same metrics."""
    for metric in metrics:
        metric.sync()
        synced = dict(metric.metric_state)
        metric.unsync()
        for name, value in synced.items():
            setattr(metric, name, value)


def end_process_group() -> None:
    """Leave the process group once every rank has tested: rank 0 goes on alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# Building the trainer --------------------------------------------------------------------
def use_sync_batchnorm(setting: Any, strategy: FinetuneStrategy | None, device_type: str) -> bool:
    """``trainer.sync_batchnorm``; ``auto``: where the backbone's BatchNorm layers learn their
    statistics (``finetune.bn=train``) on GPUs, since one rank's share of a batch would
    replace the pretrained ones. Where they are kept (``eval``/``frozen``) it would only add
    a collective per layer and step (a new head's BatchNorm learns per rank). PyTorch's
    SyncBatchNorm runs on GPUs only: on CPU each rank keeps its own statistics (DDP copies
    rank 0's buffers to every rank at each step)."""
    if setting == "auto":
        return strategy is not None and strategy.bn == "train" and device_type == "cuda"
    if setting and device_type != "cuda":
        raise UserError(
            "trainer.sync_batchnorm=true needs GPUs (PyTorch's SyncBatchNorm): on "
            f"{device_type} set it to auto or false"
        )
    return bool(setting)


def ddp_options(
    trainer: Mapping[str, Any], strategy: FinetuneStrategy, network: nn.Module
) -> dict[str, Any]:
    """The Trainer's DDP strategy for this run (and its SyncBatchNorm plugin).

    ``find_unused_parameters`` only where the trainable set changes during the run (lp_ft,
    gradual): DDP all-reduces only the parameters that train when
    it wraps the network, so they all train then (the strategy freezes after the wrap) and
    some have no gradient in some steps. ``static_graph`` stays off: it forbids that
    change and gains nothing without activation checkpointing.
    """
    from pytorch_lightning.strategies import DDPStrategy

    from transferlab.finetune.stages import backbone_stages
    from transferlab.models.sync_batchnorm import TimmSyncBatchNorm
    from transferlab.runtime import device_type_of

    epochs = int(trainer.get("max_epochs") or 1)
    changes = strategy.trainable_set_changes(len(backbone_stages(network.backbone)), epochs)
    device_type = device_type_of(trainer.get("accelerator", "auto"))
    sync = use_sync_batchnorm(trainer.get("sync_batchnorm", "auto"), strategy, device_type)
    return {
        "strategy": DDPStrategy(find_unused_parameters=changes),
        "sync_batchnorm": False,  # the plugin below instead of torch's converter
        "plugins": [TimmSyncBatchNorm()] if sync else [],
    }
