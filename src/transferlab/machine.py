"""What this machine is, and how a run's threads wait on it, decided before torch loads.

OpenMP reads ``OMP_WAIT_POLICY`` once, when torch loads it, so the choice is made here,
without importing torch, and written to the environment first. Measured on 2-core AMD
EPYCs (docs/performance.md): on a quiet machine, OpenMP's default (threads spin briefly
while they wait) trains 1.4-1.5x faster than ``PASSIVE`` (threads sleep); but when two
processes with spinning threads share the cores, they slow down 1.4-10x, and a sleeping
policy avoids that. So ``PASSIVE`` is chosen only when this job shares its cores: a
parallel sweep, or other processes already busy when the run starts.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from transferlab.errors import UserError

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
# Other processes using at least this many cores' worth of CPU count as a busy core.
BUSY_CORE = 0.5


@dataclass(frozen=True)
class Cpu:
    """The CPU model and the instruction-set flags that decide speed settings."""

    model: str
    flags: frozenset[str] = field(default_factory=frozenset)
    arch: str = ""

    @property
    def x86(self) -> bool:
        return self.arch in ("x86_64", "AMD64", "i686")

    @property
    def bf16_flags(self) -> list[str]:
        """The native bf16 instructions this CPU has (AVX-512 BF16, AMX), if any."""
        return [flag for flag in ("avx512_bf16", "amx_bf16") if flag in self.flags]

    def vector_isa(self) -> str:
        """The widest vector instruction set, as a short word (avx512, avx2, ...)."""
        for flag in ("avx512f", "avx2", "avx", "asimd", "neon"):
            if flag in self.flags:
                return flag
        return "none"

    def describe(self) -> str:
        extras = ", ".join(self.bf16_flags) or "no bf16 instructions"
        return f"{self.model} ({self.arch}, {self.vector_isa()}, {extras})"


@cache
def cpu() -> Cpu:
    """This machine's CPU, from the first processor of /proc/cpuinfo where there is one."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, sep, value = (part.strip() for part in line.partition(":"))
                if sep and key in ("model name", "flags", "Features"):
                    fields.setdefault(key, value)
                elif not line.strip() and fields:
                    break  # the end of the first processor's block
    except OSError:
        pass
    flags = fields.get("flags") or fields.get("Features") or ""
    model = fields.get("model name") or platform.processor() or "unknown"
    return Cpu(model=model, flags=frozenset(flags.split()), arch=platform.machine())


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's total)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _busy_jiffies(cpus: set[int] | None) -> int | None:
    """Busy time of ``cpus`` (all when None) from /proc/stat, in clock ticks."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            lines = [line.split() for line in f if line.startswith("cpu")]
    except OSError:
        return None
    total = 0
    for fields in lines:
        name = fields[0]
        if cpus is None and name != "cpu":
            continue
        if cpus is not None and (name == "cpu" or int(name[3:]) not in cpus):
            continue
        values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        total += sum(values) - values[3] - values[4]
    return total


def busy_cores_of_others(interval: float = 0.25) -> float | None:
    """How many of this process's cores other processes kept busy over ``interval`` seconds.

    Busy time of the usable cores from /proc/stat, less this process's own CPU time over
    the same span. None where /proc/stat is not there (not Linux).
    """
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    before, own_before, started = _busy_jiffies(cpus), _own_cpu_seconds(), time.perf_counter()
    if before is None:
        return None
    time.sleep(interval)
    after, own_after, elapsed = _busy_jiffies(cpus), _own_cpu_seconds(), time.perf_counter()
    if after is None:
        return None
    others = (after - before) / tick - (own_after - own_before)
    return max(0.0, others / (elapsed - started))


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass(frozen=True)
class Setting:
    """One speed setting of a run: its value and why it was chosen."""

    value: Any
    why: str


def threads_per_job(launcher: Mapping[str, Any], cores: int) -> int | None:
    """A submitit job's ``cpus_per_task``; else cores // jobs running at once (joblib).

    None (torch's default, all cores) when jobs run one at a time.
    """
    if launcher.get("cpus_per_task"):
        return int(launcher["cpus_per_task"])
    parallel = parallel_jobs(launcher, cores)
    return None if parallel == 1 else max(1, cores // parallel)


def parallel_jobs(launcher: Mapping[str, Any], cores: int) -> int:
    """How many jobs of a sweep the launcher runs at once on this machine (1: one at a time)."""
    jobs = launcher.get("n_jobs")
    if not isinstance(jobs, int) or jobs == 1:
        return 1
    return jobs if jobs > 0 else max(1, cores + 1 + jobs)  # joblib: -1 means all cores


def choose_wait_policy(
    threads: int,
    cores: int,
    parallel: int,
    others_busy: float | None,
    environ: Mapping[str, str],
) -> Setting:
    """``PASSIVE`` where this job shares its cores, else OpenMP's default (see module doc).

    ``threads``: this job's torch threads; ``parallel``: jobs of the same sweep running at
    once on this machine; ``others_busy``: cores other processes kept busy just before the
    run (None: unknown). A policy already in the environment is kept.
    """
    if environ.get(WAIT_POLICY_ENV):
        return Setting(environ[WAIT_POLICY_ENV], "set in the environment")
    if parallel > 1:
        return Setting("PASSIVE", f"{parallel} sweep jobs share {cores} cores")
    if others_busy is not None and others_busy >= BUSY_CORE:
        free = max(0, cores - round(others_busy))
        if threads > free:
            return Setting(
                "PASSIVE",
                f"other processes keep {others_busy:.1f} of {cores} cores busy: "
                f"{threads} threads on {free} free",
            )
    return Setting(
        "default", f"{threads} threads on {cores} cores, not shared: spinning waits are fastest"
    )


# The policy this process wrote for OpenMP (a sweep worker runs several jobs in one process).
_applied: Setting | None = None


def apply_wait_policy(setting: Setting) -> Setting:
    """Write the policy to the environment for OpenMP; too late once torch is loaded."""
    global _applied
    if _applied is not None and os.environ.get(WAIT_POLICY_ENV) == _applied.value:
        return Setting(_applied.value, f"{_applied.why} (chosen by this process's first job)")
    if WAIT_POLICY_ENV in os.environ:
        return setting
    if "torch" in sys.modules:
        wanted = "" if setting.value == "default" else f" (wanted {setting.value})"
        return Setting("default", f"torch was loaded before the run started{wanted}")
    if setting.value != "default":
        os.environ[WAIT_POLICY_ENV] = str(setting.value)
        _applied = setting
    return setting


def plan_threads(
    requested: int | None, launcher: Mapping[str, Any] | None, processes: int = 1
) -> dict[str, Setting]:
    """This process's torch threads and OpenMP wait policy, before torch loads.

    ``requested``: ``num_threads`` from the config (None: automatic); ``launcher``: the
    Hydra launcher's config in a sweep, None for a single run; ``processes``: the job's
    DDP processes on this node, which share its cores.
    """
    cores = usable_cores()
    parallel = parallel_jobs(launcher, cores) if launcher is not None else 1
    per_job = threads_per_job(launcher, cores) if launcher is not None else None
    if requested is not None:
        if int(requested) < 1:
            raise UserError(f"num_threads={requested} must be 1 or more (null: automatic)")
        threads = Setting(int(requested), "num_threads in the config")
    elif per_job is not None and launcher is not None and launcher.get("cpus_per_task"):
        threads = Setting(per_job, "the SLURM job's cpus_per_task")
    elif per_job is not None:
        threads = Setting(per_job, f"{cores} cores shared by {parallel} sweep jobs")
    else:
        threads = Setting(None, f"torch's default: the {cores} usable cores")
    own_cpus = launcher is not None and launcher.get("cpus_per_task")  # per SLURM task
    if processes > 1 and requested is None and not own_cpus:
        count = threads.value or cores
        threads = Setting(
            max(1, count // processes), f"{count} cores shared by {processes} DDP processes"
        )
    count = threads.value or cores
    measure = parallel == 1 and not os.environ.get(WAIT_POLICY_ENV) and "torch" not in sys.modules
    others = busy_cores_of_others() if measure else None
    policy = choose_wait_policy(count, cores, parallel, others, os.environ)
    return {"threads": threads, "omp_wait_policy": apply_wait_policy(policy)}


def setting_lines(settings: Mapping[str, Setting]) -> list[str]:
    """One aligned line per setting: name, value, why."""
    width = max((len(name) for name in settings), default=0)
    values = {name: "auto" if s.value is None else str(s.value) for name, s in settings.items()}
    value_width = max((len(v) for v in values.values()), default=0)
    return [
        f"  {name:<{width}}  {values[name]:<{value_width}}  {s.why}" for name, s in settings.items()
    ]


def setting_tags(settings: Mapping[str, Setting]) -> dict[str, str]:
    """MLflow tags: ``speed.<name>`` holds the value, ``speed.<name>.why`` the reason."""
    tags = {}
    for name, setting in settings.items():
        tags[f"speed.{name}"] = "auto" if setting.value is None else str(setting.value)
        tags[f"speed.{name}.why"] = setting.why
    return tags
