"""Benchmark: the default run as `transferlab train` against the same task in plain PyTorch.

    python scripts/bench_end_to_end.py               # 2 pairs of full default runs (about 8 min)
    python scripts/bench_end_to_end.py --pairs 3
    python scripts/bench_end_to_end.py --tiny        # a minute: 5 images per class, 1 epoch

What a user compares: the command they would run against the script they would write.
Each run is a fresh process in one new project folder (the first transferlab run creates
its MLflow store there), in this environment as it is (no
OpenMP or thread variables are set or changed here); the two alternate (T P, then P T, ...),
so drift on a noisy machine hits both. `transferlab train` runs with its defaults and
tracking on; `scripts/plain_pytorch.py` is the same task and recipe written plainly
(per-image PIL transforms, NCHW fp32). Prints the CPU, wall, fit and test seconds and test
accuracy of every run, and the median ratios; writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_startup import transferlab_command  # scripts/ is on the path when run

from transferlab.machine import cpu, usable_cores

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ROOT / "scripts" / "plain_pytorch.py"
TINY_TRANSFERLAB = [
    "data.samples_per_class=5",
    "data.val_per_class=5",
    "trainer.max_epochs=1",
    "+trainer.limit_test_batches=2",
]
TINY_PLAIN = ["--train-per-class", "5", "--val-per-class", "5", "--epochs", "1", "--test-limit", "512"]  # fmt: skip
SUMMARY = re.compile(r"^\s+(test/acc|time/fit_s|time/test_s)\s+([0-9.]+)$", re.MULTILINE)


def timed(command: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return wall, result.stdout


def run_transferlab(overrides: list[str], workdir: Path) -> dict[str, float]:
    wall, stdout = timed([*transferlab_command(), "train", *overrides], workdir)
    values = dict(SUMMARY.findall(stdout))
    policy = re.search(r"^\s+omp_wait_policy\s+(\S+)", stdout, re.MULTILINE)
    return {
        "wall_s": wall,
        "fit_s": float(values["time/fit_s"]),
        "test_s": float(values["time/test_s"]),
        "test_acc": float(values["test/acc"]),
        "omp_wait_policy": policy.group(1) if policy else "?",
    }


def run_plain(arguments: list[str], workdir: Path) -> dict[str, float]:
    wall, stdout = timed([sys.executable, str(PLAIN), *arguments], workdir)
    result = json.loads(stdout.strip().splitlines()[-1])
    return {
        "wall_s": wall,
        "fit_s": result["fit_s"],
        "test_s": result["test_s"],
        "test_acc": result["test_acc"],
    }


def summarise(rows: list[dict[str, dict]]) -> dict[str, float]:
    """Medians per path and of the per-pair ratios plain / transferlab (above 1: faster)."""
    summary: dict[str, float] = {}
    for key in ("wall_s", "fit_s", "test_s", "test_acc"):
        for path in ("transferlab", "plain"):
            summary[f"{path}_{key}"] = statistics.median(r[path][key] for r in rows)
        if key != "test_acc":
            ratios = [r["plain"][key] / r["transferlab"][key] for r in rows]
            summary[f"speedup_{key}"] = statistics.median(ratios)
            summary[f"speedup_{key}_min"] = min(ratios)
    return {k: round(v, 4 if "acc" in k else 3) for k, v in summary.items()}


def print_table(rows: list[dict[str, dict]], summary: dict[str, float]) -> None:
    print(f"\nCPU: {cpu().describe()}, {usable_cores()} usable cores")
    print(f"{'run':<22}{'wall (s)':>10}{'fit (s)':>10}{'test (s)':>10}{'test acc':>10}")
    for index, row in enumerate(rows, 1):
        for path in row["order"]:
            r = row[path]
            name = f"{index}. {path}" + (
                f" ({r['omp_wait_policy']})" if "omp_wait_policy" in r else ""
            )
            print(
                f"{name:<22}{r['wall_s']:>10.1f}{r['fit_s']:>10.1f}{r['test_s']:>10.1f}"
                f"{r['test_acc']:>10.4f}"
            )
    print(
        f"plain / transferlab (median, min): wall {summary['speedup_wall_s']:.2f}x "
        f"({summary['speedup_wall_s_min']:.2f}x), fit {summary['speedup_fit_s']:.2f}x, "
        f"test {summary['speedup_test_s']:.2f}x"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a minute: tiny data, 1 epoch")
    parser.add_argument("--pairs", type=int, default=None, help="transferlab/plain pairs (2)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/end_to_end.json"))
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for transferlab")
    args = parser.parse_args()
    args.pairs = args.pairs or (1 if args.tiny else 2)
    return args


def main() -> None:
    args = parse_args()
    overrides = [*(TINY_TRANSFERLAB if args.tiny else []), *args.overrides]
    plain_arguments = TINY_PLAIN if args.tiny else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:  # one project folder, as a user has
        for pair in range(args.pairs):
            order = ("transferlab", "plain") if pair % 2 == 0 else ("plain", "transferlab")
            row: dict = {"order": order}
            for path in order:
                if path == "transferlab":
                    row[path] = run_transferlab(overrides, Path(tmp))
                else:
                    row[path] = run_plain(plain_arguments, Path(tmp))
                print(f"pair {pair + 1}/{args.pairs} {path}: {json.dumps(row[path])}", flush=True)
            row["load_avg_1min"] = os.getloadavg()[0]
            rows.append(row)
    summary = summarise(rows)
    print_table(rows, summary)
    result = {
        "cpu": cpu().describe(),
        "cores": usable_cores(),
        "environment": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
        "overrides": overrides,
        **summary,
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
