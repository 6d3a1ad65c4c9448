"""Benchmark: where the time of the corruption suite goes, corrupting images or the model.

    python scripts/bench_shift.py                  # the default run, 1000 test images
    python scripts/bench_shift.py --images 100     # seconds
    python scripts/bench_shift.py --corruptions gaussian_noise rotate model=resnet50

The default run's config is composed from conf/ as the CLI does (classification,
efficientnet_lite0, Fashion-MNIST at 64 px; extra arguments are Hydra overrides), its data
module and network built by the project's builders, its threads planned and its runtime
(memory format, bf16 inference where native) resolved as ``transferlab train`` does. On the
first ``--images`` test images it times, per image: (a) decoding plus the clean eval
transform, (b) each corruption at every severity on the resized image (where
``with_corruption`` puts it), (c) the network's forward pass in batches of the eval batch
size. The split for the whole suite (every corruption at severities 1-5 on the whole test
split, as ``shift=corruptions`` runs it) is estimated from these.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from transferlab import CONF_DIR
from transferlab.machine import cpu, plan_threads, setting_lines
from transferlab.shift import (
    CORRUPTIONS,
    SEVERITIES,
    Corruption,
    check_corruptions,
    with_corruption,
)

HEADLINE_SEVERITY = 3


def config(overrides: list[str], workdir: Path):
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):  # outside a Hydra run the hydra:runtime paths have no value
        cfg.paths.root = str(workdir)
        cfg.paths.output_dir = str(workdir / "out")
    return cfg


def seconds_per_image(call, items: list) -> float:
    started = time.perf_counter()
    for item in items:
        call(item)
    return (time.perf_counter() - started) / len(items)


def corruption_seconds(
    datamodule, names: list[str], count: int, seed: int
) -> dict[str, dict[int, float]]:
    """Seconds per image of each corruption at each severity, on the resized test images."""
    from torchvision import transforms as T

    steps = with_corruption(datamodule.eval_transform, names[0], 1, seed).transforms
    at = next(i for i, step in enumerate(steps) if isinstance(step, Corruption))
    resized = copy.copy(datamodule.test_set)  # its images as they reach the corruption
    resized.transform = T.Compose(steps[:at])
    images = [resized[i]["image"] for i in range(count)]
    timings: dict[str, dict[int, float]] = {}
    for name in names:
        timings[name] = {}
        for severity in SEVERITIES:
            corruption = with_corruption(datamodule.eval_transform, name, severity, seed)
            corrupt = corruption.transforms[at]
            corrupt(images[0])  # first-call costs (imports, caches) stay out
            timings[name][severity] = seconds_per_image(corrupt, images)
        print(
            f"  {name:<18} " + " ".join(f"{timings[name][s] * 1e3:6.2f}" for s in SEVERITIES),
            "ms/img at severities 1-5",
            flush=True,
        )
    return timings


def model_seconds(cfg, datamodule, runtime, count: int) -> float:
    """Seconds per image of the network's forward pass in eval batches (after a warm-up)."""
    import torch

    from transferlab.build import task_options
    from transferlab.tasks import build_task

    network = build_task(task_options(cfg)).build_network(cfg.model, datamodule.num_classes)
    network = runtime.prepare(network).eval()
    batch = int(datamodule.eval_batch_size)
    images = torch.stack([datamodule.test_set[i]["image"] for i in range(count)])
    batches = list(torch.split(images, batch))
    with torch.inference_mode(), runtime.inference("cpu"):
        for x in {tuple(x.shape): x for x in batches}.values():  # each batch shape once
            network(runtime.inputs(x))
        started = time.perf_counter()
        for x in batches:
            network(runtime.inputs(x))
    return (time.perf_counter() - started) / count


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="test images timed")
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    parser.add_argument("--out", type=Path, default=Path("bench-results/shift.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the default run")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    names = check_corruptions(args.corruptions)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args.overrides, Path(tmp))
        speed = plan_threads(cfg.get("num_threads"), None)  # before torch loads, as a run

        import torch

        from transferlab.build import build_datamodule
        from transferlab.machine import Setting
        from transferlab.runtime import Runtime

        if speed["threads"].value:
            torch.set_num_threads(speed["threads"].value)
        speed["threads"] = Setting(torch.get_num_threads(), speed["threads"].why)
        runtime, runtime_speed = Runtime.from_config(cfg.trainer).resolve("cpu")
        speed.update(runtime_speed)
        print("\n".join(setting_lines(speed)), flush=True)

        datamodule = build_datamodule(cfg)
        test = datamodule.test_set
        count = min(args.images, len(test))
        clean = seconds_per_image(test.__getitem__, list(range(count)))
        print(f"clean decode + eval transform: {clean * 1e3:.3f} ms/img", flush=True)
        timings = corruption_seconds(datamodule, names, count, int(cfg.seed))
        forward = model_seconds(cfg, datamodule, runtime, count)
        print(f"model forward: {forward * 1e3:.3f} ms/img", flush=True)

    suite_images = len(test)
    per_corruption = {n: statistics.mean(timings[n].values()) for n in names}
    passes = len(names) * len(SEVERITIES)
    split = {
        "decode + eval transform": clean * passes * suite_images,
        "corruption": sum(per_corruption.values()) * len(SEVERITIES) * suite_images,
        "model forward": forward * passes * suite_images,
    }
    total = sum(split.values())
    task = f"{cfg.data.source} {cfg.data.image_size}px, {cfg.model.name}, cpu"
    print(
        f"\n{task}; eval batch {datamodule.eval_batch_size}, {speed['threads'].value} threads, "
        f"eval precision {runtime.eval_precision}; timed on {count} test images"
    )
    print(f"{'ms/image':<24}{'sev ' + str(HEADLINE_SEVERITY):>8}{'sev 1-5':>9}{'suite s':>9}")
    print(f"{'clean decode+transform':<24}{clean * 1e3:>8.3f}{'':>9}")
    for name in names:
        headline, mean = timings[name][HEADLINE_SEVERITY], per_corruption[name]
        suite = mean * len(SEVERITIES) * suite_images
        print(f"{name:<24}{headline * 1e3:>8.3f}{mean * 1e3:>9.3f}{suite:>9.0f}")
    print(f"{'model forward':<24}{forward * 1e3:>8.3f}")
    print(
        f"\nWhole suite: {len(names)} corruptions x {len(SEVERITIES)} severities x "
        f"{suite_images} images = {passes * suite_images:,} images"
    )
    for part, seconds in split.items():
        print(f"  {part:<24}{seconds:>8.0f} s  {seconds / total:>6.1%}")
    print(f"  {'total':<24}{total:>8.0f} s  ({total / 3600:.2f} h)")
    print(
        f"CPU: {cpu().describe()}; OMP_WAIT_POLICY: {os.environ.get('OMP_WAIT_POLICY', 'default')}"
    )
    result = {
        "task": task,
        "images_timed": count,
        "suite_images": suite_images,
        "corruptions": names,
        "eval_batch_size": int(datamodule.eval_batch_size),
        "eval_precision": runtime.eval_precision,
        "memory_format": runtime.memory_format,
        "torch_threads": speed["threads"].value,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "cpu": cpu().describe(),
        "load_avg_1min": os.getloadavg()[0],
        "overrides": args.overrides,
        "clean_ms_per_image": round(clean * 1e3, 4),
        "model_ms_per_image": round(forward * 1e3, 4),
        "corruption_ms_per_image": {
            n: {str(s): round(t * 1e3, 4) for s, t in timings[n].items()} for n in names
        },
        "suite_seconds": {part: round(seconds, 1) for part, seconds in split.items()},
        "suite_share": {part: round(seconds / total, 4) for part, seconds in split.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
