"""Benchmark: training throughput of `transferlab train` with 1 and N DDP processes.

    python scripts/bench_ddp.py                           # CPU: 1 and 2 processes (gloo)
    python scripts/bench_ddp.py --processes 1 2 4 8 --accelerator gpu --batch-size 64
    python scripts/bench_ddp.py --tiny                     # seconds: digits, 32 px

Each point is a real `transferlab train` (trainer=ddp with trainer.devices=N; the default
trainer for 1) on the default task with the same per-process batch (weak scaling: N
processes train on N batches per step). Throughput is read from the run's MLflow record:
the per-step `train/loss_step` timestamps after a warm-up, times images per step
(batch x processes), so process start, data loading and the process group's set-up are
left out. Scaling efficiency = throughput(N) / (N x throughput(1)).

On CPU the processes share the machine's cores (each gets cores / N threads), so N
processes bring no new hardware: there the number measures what DDP costs (gradient
all-reduce over gloo, smaller per-process matrix work), not a speed-up to expect from
N GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow

from transferlab.machine import cpu, usable_cores


def run_point(
    processes: int, args: argparse.Namespace, workdir: Path, store: str
) -> dict[str, float]:
    """One training run with ``processes`` processes; its steady-state throughput."""
    trainer = (
        ["trainer=ddp", f"trainer.devices={processes}"] if processes > 1 else ["trainer.devices=1"]
    )
    overrides = [
        *trainer,
        f"trainer.accelerator={args.accelerator}",
        "trainer.max_epochs=1",
        f"+trainer.limit_train_batches={args.steps}",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "trainer.log_every_n_steps=1",
        f"data.batch_size={args.batch_size}",
        f"tracking.uri={store}",
        "tracking.experiment_name=bench_ddp",
        f"hydra.run.dir={workdir / f'p{processes}'}",
        *(["data=digits", "data.image_size=32"] if args.tiny else []),
        *args.overrides,
    ]
    command = [sys.executable, "-m", "transferlab.train", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir)
    if result.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{result.stderr[-3000:]}")
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("bench_ddp")
    run = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])[0]
    history = sorted(
        client.get_metric_history(run.info.run_id, "train/loss_step"), key=lambda m: m.step
    )
    steady = [m for m in history if m.step >= args.warmup]
    if len(steady) < 2:
        raise SystemExit(f"--steps {args.steps} leaves too few steps after --warmup {args.warmup}")
    seconds = (steady[-1].timestamp - steady[0].timestamp) / 1000
    images = (steady[-1].step - steady[0].step) * args.batch_size * processes
    return {
        "processes": processes,
        "threads_per_process": int(run.data.tags.get("speed.threads", "0") or 0),
        "images_per_s": images / seconds,
        "steps_timed": steady[-1].step - steady[0].step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="training steps per process")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out")
    parser.add_argument("--tiny", action="store_true", help="digits at 32 px, a few steps")
    parser.add_argument("--out", type=Path, default=Path("bench-results/ddp.json"))
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.warmup, args.batch_size = 8, 2, 16
    if 1 not in args.processes:
        parser.error("--processes must include 1 (the baseline)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        store = f"sqlite:///{workdir / 'mlflow.db'}"
        points = [run_point(n, args, workdir, store) for n in sorted(set(args.processes))]
    base = next(p for p in points if p["processes"] == 1)["images_per_s"]
    for point in points:
        point["speedup"] = point["images_per_s"] / base
        point["efficiency"] = point["speedup"] / point["processes"]
    machine = cpu().describe() if args.accelerator == "cpu" else args.accelerator
    report = {
        "machine": machine,
        "cores": usable_cores(),
        "load_before": os.getloadavg()[0],
        "batch_size_per_process": args.batch_size,
        "points": points,
    }
    print(f"{machine}, {usable_cores()} cores; per-process batch {args.batch_size}")
    print("processes  threads  images/s  speed-up  efficiency")
    for p in points:
        print(
            f"{p['processes']:>9}  {p['threads_per_process']:>7}  {p['images_per_s']:>8.1f}  "
            f"{p['speedup']:>7.2f}x  {p['efficiency']:>10.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Report: {args.out}")


if __name__ == "__main__":
    main()
