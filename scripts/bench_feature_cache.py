"""Benchmark: a linear probe with and without the feature cache, in one run.

    python scripts/bench_feature_cache.py            # the default task, 20 epochs
    python scripts/bench_feature_cache.py --tiny     # seconds: digits, 32 px, 2 epochs

Both runs train the same head on the same batches (the cache only skips recomputing the
frozen backbone); the script prints fit times, their ratio and the validation accuracy of
each, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from transferlab import CONF_DIR
from transferlab.build import build_parts


def config(tiny: bool, epochs: int):
    overrides = ["finetune=linear_probe", f"trainer.max_epochs={epochs}"]
    if tiny:
        overrides += ["data=digits", "data.samples_per_class=10", "data.image_size=32"]
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root = cfg.paths.output_dir = "."
    return cfg


def fit_seconds(cfg, cached: bool) -> tuple[float, float]:
    pl.seed_everything(cfg.seed, verbose=False)
    with open_dict(cfg):
        cfg.finetune.feature_cache = cached
    parts = build_parts(cfg)
    data, extra = parts.fit_data, parts.trainer_options
    assert (data is not parts.datamodule) == cached
    trainer = pl.Trainer(
        max_epochs=cfg.trainer.max_epochs,
        callbacks=[parts.strategy],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        **extra,
    )
    started = time.perf_counter()
    trainer.fit(parts.module, datamodule=data)
    return time.perf_counter() - started, float(trainer.callback_metrics["val/acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-results/feature_cache.json"))
    args = parser.parse_args()
    epochs = args.epochs or (2 if args.tiny else 20)
    cfg = config(args.tiny, epochs)

    plain_s, plain_acc = fit_seconds(cfg, cached=False)
    cached_s, cached_acc = fit_seconds(cfg, cached=True)
    result = {
        "task": "digits 32px" if args.tiny else f"{cfg.data.source} {cfg.data.image_size}px",
        "model": cfg.model.name,
        "epochs": epochs,
        "uncached_fit_s": round(plain_s, 2),
        "cached_fit_s": round(cached_s, 2),
        "speedup": round(plain_s / cached_s, 2),
        "uncached_val_acc": round(plain_acc, 4),
        "cached_val_acc": round(cached_acc, 4),
    }
    print(f"{'':<10}{'fit (s)':>10}{'val/acc':>10}")
    print(f"{'uncached':<10}{plain_s:>10.2f}{plain_acc:>10.4f}")
    print(f"{'cached':<10}{cached_s:>10.2f}{cached_acc:>10.4f}")
    print(f"speed-up: {plain_s / cached_s:.1f}x  ({epochs}-epoch linear probe, {result['task']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
