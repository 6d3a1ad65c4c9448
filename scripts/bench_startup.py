"""Benchmark: start-up time of the CLI and of the default training run.

    python scripts/bench_startup.py            # --help 5 times, the default run 3 times
    python scripts/bench_startup.py --tiny     # seconds: --help once, the smoke run once

Times ``transferlab --help`` and the time from the command to the first training step
(the progress bar's first ``Epoch 0`` line; the run is then stopped), each as the median of
fresh processes, plus the import time of each heavy dependency on its own, and which of them
``--help`` loads (none should be).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
HEAVY = ("torch", "torchvision", "timm", "pytorch_lightning", "mlflow")
FIRST_STEP = b"Epoch 0:"


def transferlab_command() -> list[str]:
    script = shutil.which("transferlab", path=str(BIN))
    return [script] if script else [sys.executable, "-m", "transferlab.cli"]


def seconds(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - started


def seconds_to_first_step(overrides: list[str], cwd: Path) -> float:
    """From the command to the first training step; the run is stopped there."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [*transferlab_command(), "train", *overrides],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seen = b""
    try:
        while FIRST_STEP not in seen:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the run ended before its first step:\n{seen[-3000:]!r}")
            seen = seen[-4096:] + chunk
        return time.perf_counter() - started
    finally:
        process.kill()
        process.wait()


def help_imports(cwd: Path) -> list[str]:
    """The heavy modules that ``transferlab --help`` imports."""
    code = (
        "import sys, contextlib, io\n"
        "from transferlab.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, check=True, capture_output=True, text=True
    )
    return [m for m in result.stdout.strip().split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-results/startup.json"))
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.tiny else 5)
    run_overrides = ["experiment=smoke"] if args.tiny else []

    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        result: dict[str, object] = {"help_imports": help_imports(cwd)}
        result["help_s"] = statistics.median(
            seconds([*transferlab_command(), "--help"], cwd) for _ in range(repeats)
        )
        for module in () if args.tiny else HEAVY:
            result[f"import_{module}_s"] = statistics.median(
                seconds([sys.executable, "-c", f"import {module}"], cwd) for _ in range(3)
            )
        result["first_step_s"] = statistics.median(
            seconds_to_first_step(run_overrides, cwd) for _ in range(max(1, repeats - 2))
        )
    result = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
    print(f"{'transferlab --help':<40}{result['help_s']:>8.2f} s")
    run = "smoke run" if args.tiny else "default run"
    print(f"{'command to first training step, ' + run:<40}{result['first_step_s']:>8.2f} s")
    for module in HEAVY:
        if f"import_{module}_s" in result:
            print(f"{'import ' + module:<40}{result[f'import_{module}_s']:>8.2f} s")
    print(f"heavy modules imported by --help: {', '.join(result['help_imports']) or 'none'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
