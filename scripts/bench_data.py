"""Benchmark: images per second the DataModule delivers alone, against the model's throughput.

    python scripts/bench_data.py              # fashion_mnist 64 px and a JPEG folder at 224 px
    python scripts/bench_data.py --tiny       # seconds: digits 32 px and a small JPEG folder

For each dataset, the training and evaluation loaders are read with no model (the batches are
only counted), for each ``num_workers`` asked; then the default backbone's training and
inference throughput is measured at the same image size with the default runtime
(channels_last, bf16 inference where native). A loader faster than the model never makes the
run wait; the ``headroom`` columns say by how much.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from transferlab import CONF_DIR
from transferlab.data import TransferDataModule
from transferlab.data.sources import load_source
from transferlab.models import build_classifier, model_data_config
from transferlab.runtime import Runtime


def write_jpeg_folder(root: Path, per_class: int, size: int) -> Path:
    """Fashion-MNIST images upscaled to ``size`` px RGB JPEGs, one folder per class."""
    raw = load_source("fashion_mnist")
    for label, name in enumerate(raw.class_names[:5]):
        folder = root / name.replace("/", "-")
        folder.mkdir(parents=True)
        picks = np.flatnonzero(raw.train.labels == label)[:per_class]
        for index in picks:
            image = raw.train.load(int(index)).convert("RGB").resize((size, size))
            image.save(folder / f"{index}.jpg", quality=90)
    return root


def loader_rate(loader, max_images: int) -> float:
    """Images per second of iterating ``loader`` (worker start-up included), up to ``max_images``."""
    images = 0
    started = time.perf_counter()
    while images < max_images:
        for x, _ in loader:
            images += len(x)
            if images >= max_images:
                break
    return images / (time.perf_counter() - started)


def model_rates(cfg, image_size: int, batch: int, steps: int) -> dict[str, float]:
    """Training and inference images/s of the backbone on random images of ``image_size``."""
    runtime = Runtime.from_config(cfg.trainer)
    network = runtime.prepare(build_classifier(cfg.model, num_classes=10))
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch,))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)

    def train_step() -> None:
        loss = torch.nn.functional.cross_entropy(network(runtime.inputs(x)), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    @torch.inference_mode()
    def eval_step() -> None:
        with runtime.inference("cpu"):
            network(runtime.inputs(x))

    rates = {}
    for name, step, mode in (("train", train_step, True), ("eval", eval_step, False)):
        network.train(mode)
        step()  # warm-up
        started = time.perf_counter()
        for _ in range(steps):
            step()
        rates[name] = batch * steps / (time.perf_counter() - started)
    return rates


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.root = cfg.paths.output_dir = "."
    return cfg


def bench_dataset(overrides: list[str], workers: list[int], max_images: int, steps: int):
    cfg = compose_cfg(overrides)
    rows = []
    for num_workers in workers:
        data = TransferDataModule(
            **{**cfg.data, "num_workers": num_workers},
            seed=cfg.seed,
            data_config=model_data_config(cfg.model),
        )
        data.setup("fit")
        rows.append(
            {
                "num_workers": num_workers,
                "loader_train_img_s": loader_rate(data.train_dataloader(), max_images),
                "loader_eval_img_s": loader_rate(data.test_dataloader(), max_images),
            }
        )
    size = int(cfg.data.image_size)
    model = model_rates(cfg, size, int(cfg.data.batch_size), steps)
    for row in rows:
        row.update({f"model_{k}_img_s": v for k, v in model.items()})
        row["headroom_train"] = row["loader_train_img_s"] / model["train"]
        row["headroom_eval"] = row["loader_eval_img_s"] / model["eval"]
    return f"{cfg.data.source} {size}px", rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--workers", type=int, nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-results/data.json"))
    args = parser.parse_args()
    workers = args.workers or ([0] if args.tiny else [0, 1, 2])
    max_images, steps = (256, 1) if args.tiny else (4000, 5)

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_jpeg_folder(Path(tmp), 8 if args.tiny else 200, 64 if args.tiny else 256)
        datasets = [
            ["data=digits"] if args.tiny else ["data=fashion_mnist"],
            ["data=image_folder", f"data.root={folder}", *(["data.image_size=64"] * args.tiny)],
        ]
        results = {}
        for overrides in datasets:
            name, rows = bench_dataset(overrides, workers, max_images, steps)
            results[name] = [{k: round(v, 2) for k, v in row.items()} for row in rows]

    header = ("workers", "loader train", "loader eval", "model train", "model eval", "headroom")
    print(f"{'images/s':<22}" + "".join(f"{h:>14}" for h in header))
    for name, rows in results.items():
        for row in rows:
            keys = (
                "loader_train_img_s",
                "loader_eval_img_s",
                "model_train_img_s",
                "model_eval_img_s",
            )
            values = "".join(f"{row[k]:>14.0f}" for k in keys)
            headroom = f"{row['headroom_train']:.0f}x / {row['headroom_eval']:.1f}x"
            print(f"{name:<22}{row['num_workers']:>14}{values}{headroom:>14}")
    print("headroom: loader over model images/s, training / evaluation")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
