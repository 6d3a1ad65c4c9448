"""Benchmark: peak resident memory of the default run, and whether it grows epoch by epoch.

    python scripts/bench_memory.py             # the default run (10 epochs)
    python scripts/bench_memory.py --tiny      # seconds: the smoke run, 4 short epochs

Runs `transferlab train` in this process (composed from conf/ as the CLI does, MLflow logging
on) with a callback that reads the resident set size after every training epoch. Growth after
the first epoch would mean metrics or tensors accumulating across epochs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from transferlab import CONF_DIR
from transferlab.train import run as transferlab_run


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class RssMonitor(pl.Callback):
    """Records the resident set size at the end of every training epoch."""

    last: RssMonitor | None = None

    def __init__(self) -> None:
        self.per_epoch: list[float] = []
        RssMonitor.last = self

    def on_train_epoch_end(self, trainer, module) -> None:
        self.per_epoch.append(status_mib("VmRSS"))


def config(tiny: bool, workdir: Path):
    overrides = ["tracking.experiment_name=bench_memory"]
    if tiny:
        overrides += ["experiment=smoke", "trainer.max_epochs=4", "trainer.limit_train_batches=3"]
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root = str(workdir)
        cfg.paths.output_dir = str(workdir / "run")
        del cfg.callbacks["early_stopping"]  # every epoch runs, so growth would show
        cfg.callbacks.rss_monitor = {"_target_": "__main__.RssMonitor"}
        cfg.allowed_targets.append("__main__.*")
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--out", type=Path, default=Path("bench-results/memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args.tiny, Path(tmp))
        transferlab_run(cfg)
    per_epoch = RssMonitor.last.per_epoch
    result = {
        "run": "smoke" if args.tiny else "default",
        "epochs": len(per_epoch),
        "peak_rss_mib": round(status_mib("VmHWM"), 1),
        "rss_per_epoch_mib": [round(v, 1) for v in per_epoch],
        "growth_after_first_epoch_mib": round(per_epoch[-1] - per_epoch[0], 1),
    }
    print(f"peak RSS: {result['peak_rss_mib']:.0f} MiB ({result['run']} run)")
    print("RSS after each epoch (MiB): " + " ".join(f"{v:.0f}" for v in per_epoch))
    print(f"growth from epoch 1 to {len(per_epoch)}: {result['growth_after_first_epoch_mib']} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
