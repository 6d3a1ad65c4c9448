"""Benchmark: OpenMP's wait policy and thread count, on a quiet machine and on shared cores.

    python scripts/bench_wait_policy.py            # lite0, 64 px, batch 32; 2 rounds
    python scripts/bench_wait_policy.py --tiny     # seconds: 32 px, a few steps

The evidence behind transferlab's rule (transferlab.machine): OpenMP's default wait policy
on a quiet machine, ``PASSIVE`` where cores are shared. Each measurement is a fresh process
(OpenMP reads the policy once, when torch loads) that takes training steps of the backbone
and prints images/s. Quiet: each policy in turn, alternating. Shared: a first training
process (OpenMP default, all cores) runs throughout and logs its own images/s; a second one
is started beside it with each setting in turn, and both rates are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transferlab.machine import cpu, usable_cores

STEPS = """
import sys, time, torch, timm
size, batch, steps, seconds, log = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
layout = torch.channels_last
model = timm.create_model("tf_efficientnet_lite0", num_classes=10).to(memory_format=layout)
optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
x = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
y = torch.randint(0, 10, (batch,))
def step():
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward(); optimizer.step(); optimizer.zero_grad()
for _ in range(2):
    step()
if seconds > 0:  # the background process: log images/s every second until the time is up
    end, out = time.time() + seconds, open(log, "w")
    while time.time() < end:
        started, n = time.time(), 0
        while time.time() - started < 1.0:
            step(); n += batch
        out.write(f"{time.time():.2f} {n / (time.time() - started):.1f}\\n"); out.flush()
else:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    print(steps * batch / (time.perf_counter() - started))
"""


def environment(policy: str, threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def rate(args: argparse.Namespace, policy: str, threads: int | None) -> tuple[float, float, float]:
    """Images/s of a fresh process with ``policy`` and ``threads``; its start and end times."""
    command = [
        sys.executable,
        "-c",
        STEPS,
        str(args.size),
        str(args.batch),
        str(args.steps),
        "0",
        "",
    ]
    started = time.time()
    result = subprocess.run(
        command, env=environment(policy, threads), capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip().splitlines()[-1]), started, time.time()


def logged_rates(log: Path, start: float, end: float) -> list[float]:
    rows = [line.split() for line in log.read_text().splitlines() if line.strip()]
    return [float(r) for t, r in rows if start + 1.0 <= float(t) <= end]


SETTINGS = [("default", None), ("PASSIVE", None), ("default", 1), ("PASSIVE", 1)]


def quiet(args: argparse.Namespace) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"default": [], "PASSIVE": []}
    for round_ in range(args.rounds):
        order = ["default", "PASSIVE"] if round_ % 2 == 0 else ["PASSIVE", "default"]
        for policy in order:
            results[policy].append(rate(args, policy, None)[0])
    return results


def shared(args: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "background.log"
        seconds = 900.0  # longer than all the settings take; stopped at the end
        background = subprocess.Popen(
            [sys.executable, "-c", STEPS, str(args.size), str(args.batch), "0", str(seconds), str(log)],
            env=environment("default", None),
        )  # fmt: skip
        try:
            while not log.exists() or not log.read_text().strip():
                time.sleep(0.5)
            alone = logged_rates(log, 0.0, time.time() + 1)
            for policy, threads in SETTINGS:
                second, start, end = rate(args, policy, threads)
                first = logged_rates(log, start, end)
                rows.append({
                    "second": f"{policy}, {threads or usable_cores()} threads",
                    "second_img_s": second,
                    "first_img_s_median": statistics.median(first) if first else None,
                })  # fmt: skip
        finally:
            background.kill()
            background.wait()
    rows.insert(0, {"first_alone_img_s": statistics.median(alone) if alone else None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="seconds: 32 px, a few steps")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-results/wait_policy.json"))
    args = parser.parse_args()
    args.size, args.batch = (32, 8) if args.tiny else (64, 32)
    args.steps = 3 if args.tiny else 15
    args.rounds = args.rounds or (1 if args.tiny else 2)

    quiet_rates = quiet(args)
    shared_rows = shared(args)
    print(f"\nCPU: {cpu().describe()}, {usable_cores()} usable cores")
    print("quiet machine, training images/s per round:")
    for policy, values in quiet_rates.items():
        print(f"  {policy:<8} " + " / ".join(f"{v:.1f}" for v in values))
    print(f"shared cores (the first process alone: {shared_rows[0]['first_alone_img_s']} img/s):")
    for row in shared_rows[1:]:
        print(
            f"  second: {row['second']:<22} {row['second_img_s']:>7.1f} img/s;"
            f"  first meanwhile: {row['first_img_s_median']} img/s"
        )
    result = {"cpu": cpu().describe(), "quiet": quiet_rates, "shared": shared_rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
