"""The OpenMP wait policy and threads a run picks for the machine, before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from transferlab.errors import UserError
from transferlab.machine import (
    WAIT_POLICY_ENV,
    Setting,
    apply_wait_policy,
    busy_cores_of_others,
    choose_wait_policy,
    cpu,
    plan_threads,
    setting_tags,
    usable_cores,
)

SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"


def spinners(count: int, seconds: float = 30.0) -> list[subprocess.Popen]:
    """``count`` processes that each keep one core busy for ``seconds``."""
    return [
        subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)]) for _ in range(count)
    ]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait()


@pytest.mark.parametrize(
    ("threads", "cores", "parallel", "others", "environ", "policy", "reason"),
    [
        (2, 2, 1, 0.0, {}, "default", "not shared"),  # a quiet machine: spin
        (2, 2, 1, None, {}, "default", "not shared"),  # unknown load (no /proc/stat)
        (2, 2, 1, 0.3, {}, "default", "not shared"),  # a daemon's blip is no busy core
        (2, 2, 1, 1.0, {}, "PASSIVE", "other processes keep 1.0 of 2 cores busy"),
        (2, 2, 1, 2.0, {}, "PASSIVE", "2 threads on 0 free"),
        (2, 4, 1, 1.0, {}, "default", "not shared"),  # enough free cores for both threads
        (1, 2, 2, None, {}, "PASSIVE", "2 sweep jobs share 2 cores"),
        (2, 2, 1, 2.0, {WAIT_POLICY_ENV: "ACTIVE"}, "ACTIVE", "set in the environment"),
    ],
)
def test_wait_policy_is_passive_only_where_cores_are_shared(
    threads, cores, parallel, others, environ, policy, reason
) -> None:
    setting = choose_wait_policy(threads, cores, parallel, others, environ)
    assert setting.value == policy
    assert reason in setting.why


def test_busy_cores_of_others_counts_other_processes() -> None:
    load = spinners(min(2, usable_cores()))
    try:
        time.sleep(1.0)  # the spinners are past their start-up
        busy = busy_cores_of_others(interval=0.5)
    finally:
        stop(load)
    assert busy is not None and busy >= 0.8 * min(2, usable_cores())


def test_busy_cores_leave_out_this_process() -> None:
    """A busy thread of our own is not another process; only compare with the same load."""
    import threading

    stop_spin = threading.Event()

    def spin() -> None:
        while not stop_spin.is_set():
            pass

    baseline = busy_cores_of_others(interval=0.3)
    thread = threading.Thread(target=spin)
    thread.start()
    try:
        with_own_spin = busy_cores_of_others(interval=0.3)
    finally:
        stop_spin.set()
        thread.join()
    assert baseline is not None and with_own_spin is not None
    assert with_own_spin < baseline + 0.5


def test_threads_follow_config_sweep_and_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WAIT_POLICY_ENV, "PASSIVE")  # nothing to measure or apply here
    cores = usable_cores()
    assert plan_threads(3, None)["threads"] == Setting(3, "num_threads in the config")
    assert plan_threads(None, None)["threads"].value is None
    slurm = plan_threads(None, {"cpus_per_task": 4})["threads"]
    assert slurm == Setting(4, "the SLURM job's cpus_per_task")
    joblib = plan_threads(None, {"n_jobs": 2})["threads"]
    assert joblib.value == max(1, cores // 2) and "sweep jobs" in joblib.why
    with pytest.raises(UserError, match="num_threads=0"):
        plan_threads(0, None)


def test_a_policy_comes_too_late_once_torch_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch  # noqa: F401  (loaded, as in any process that imported torch first)

    monkeypatch.delenv(WAIT_POLICY_ENV, raising=False)
    setting = apply_wait_policy(Setting("PASSIVE", "2 sweep jobs share 2 cores"))
    assert setting.value == "default" and "torch was loaded before" in setting.why
    assert "wanted PASSIVE" in setting.why and WAIT_POLICY_ENV not in os.environ
    quiet = apply_wait_policy(Setting("default", "2 threads on 2 cores, not shared"))
    assert quiet == Setting("default", "torch was loaded before the run started")


def test_the_policy_reaches_openmp_before_torch_loads() -> None:
    """In a fresh process the chosen policy is in the environment when torch starts OpenMP."""
    code = (
        "import os, sys\n"
        "from transferlab.machine import plan_threads\n"
        "plan = plan_threads(None, {'n_jobs': 2})\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "print(plan['omp_wait_policy'].value, os.environ.get('OMP_WAIT_POLICY'))\n"
        "again = plan_threads(None, {'n_jobs': 2})['omp_wait_policy']\n"  # the worker's next job
        "print(again.value, again.why)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != WAIT_POLICY_ENV}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    first, second = result.stdout.splitlines()
    assert first.split() == ["PASSIVE", "PASSIVE"]
    assert (
        second
        == "PASSIVE 2 sweep jobs share 2 cores (chosen by this process's first job)".replace(
            "2 cores", f"{usable_cores()} cores"
        )
    )


def test_settings_become_tags_with_their_reasons() -> None:
    tags = setting_tags({"threads": Setting(2, "x"), "omp_wait_policy": Setting(None, "y")})
    assert tags == {
        "speed.threads": "2",
        "speed.threads.why": "x",
        "speed.omp_wait_policy": "auto",
        "speed.omp_wait_policy.why": "y",
    }


def test_cpu_names_its_model_and_flags() -> None:
    this = cpu()
    assert this.model and this.arch
    assert this.describe().startswith(this.model)
