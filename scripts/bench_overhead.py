"""Benchmark: `transferlab train` against the training loop a user would write by hand.

    python scripts/bench_overhead.py                  # the default run's task, 5 repeats
    python scripts/bench_overhead.py --tiny           # seconds: digits, 32 px, 1 repeat
    python scripts/bench_overhead.py --device cuda --model resnet50 --image-size 224
    python scripts/bench_overhead.py --task segmentation --batch-size 16 --eval-batch-size 32
    python scripts/bench_overhead.py --task detection --batch-size 16 --eval-batch-size 32

Each repeat runs three paths in turn (A B C, then C B A, ...): transferlab's `run()` composed from
conf/ as the CLI does (its real Trainer, callbacks and MLflow logging); a plain PyTorch loop
as first written (NCHW, fp32, per-sample PIL transforms); and the same plain loop with the
memory format and inference precision that suit the hardware (channels_last, bf16 autocast
for evaluation where the hardware has native bf16). All train the same backbone with the
same images, batch size, optimizer and BatchNorm policy for the same number of steps, then
evaluate the same test batches. Ratios are taken within a repeat; the medians are reported.
Extra arguments are Hydra overrides for the transferlab path, e.g.
``trainer.memory_format=contiguous trainer.eval_precision=32`` for the unoptimised path.

All three paths share this process, and so its OpenMP settings: the environment's as they
are, as a user's own loop would have them (nothing is set here; transferlab's ``run()``
finds torch already loaded and records the policy it found).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from timm.data import create_transform
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.detection import MeanAveragePrecision

from transferlab import CONF_DIR
from transferlab.build import build_datamodule
from transferlab.data.datasets import to_mode
from transferlab.machine import cpu
from transferlab.models import build_classifier
from transferlab.models.detection import build_detector, detection_loss
from transferlab.models.segmentation import build_segmenter
from transferlab.runtime import native_bf16
from transferlab.tasks.segmentation import SegmentationLoss
from transferlab.train import run as transferlab_run

PATHS = ("transferlab", "plain", "plain_fast")


class PhaseTimer(pl.Callback):
    """Times the training batches and the test batches (data loading included)."""

    last: PhaseTimer | None = None

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {"train": [], "test": []}
        self.images = {"train": 0, "test": 0}
        PhaseTimer.last = self

    def _start(self, phase: str) -> None:
        self.times[phase] = [time.perf_counter(), time.perf_counter()]

    def _end(self, phase: str, batch) -> None:
        sync(batch["image"].device)
        self.times[phase][1] = time.perf_counter()
        self.images[phase] += len(batch["image"])

    def on_train_epoch_start(self, trainer, module) -> None:
        self._start("train")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._end("train", batch)

    def on_test_epoch_start(self, trainer, module) -> None:
        self._start("test")

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self._end("test", batch)

    def rate(self, phase: str) -> float:
        start, end = self.times[phase]
        return self.images[phase] / (end - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def config(args: argparse.Namespace, workdir: Path):
    overrides = [
        f"model={args.model}",
        "trainer.max_epochs=1",
        f"+trainer.limit_train_batches={args.steps}",
        "+trainer.limit_val_batches=2",
        f"+trainer.limit_test_batches={args.eval_batches}",
        f"data.batch_size={args.batch_size}",
        f"data.eval_batch_size={args.eval_batch_size}",
        "tracking.experiment_name=bench_overhead",
    ]
    if args.image_size:
        overrides.append(f"data.image_size={args.image_size}")
    if args.task in ("segmentation", "detection"):
        overrides.insert(0, f"task={args.task}")
        if args.tiny:
            overrides += ["data.image_size=64", "data.train_images=16"]
    elif args.tiny:
        overrides += ["data=digits", "data.image_size=32", "data.samples_per_class=null"]
    if args.device == "cuda":
        overrides.append("trainer=gpu")
    with initialize_config_dir(config_dir=str(CONF_DIR)):
        cfg = compose("train", overrides=overrides + args.overrides)
    with open_dict(cfg):
        cfg.paths.root = str(workdir)
        cfg.callbacks.phase_timer = {"_target_": "__main__.PhaseTimer"}
        cfg.allowed_targets.append("__main__.*")
    return cfg


def run_transferlab(cfg) -> dict[str, float]:
    with open_dict(cfg):  # a fresh checkpoint folder for every run
        cfg.paths.output_dir = tempfile.mkdtemp(dir=cfg.paths.root, prefix="run-")
    transferlab_run(cfg)
    timer = PhaseTimer.last
    return {"train": timer.rate("train"), "eval": timer.rate("test")}


class PerSampleImages(Dataset):
    """What a hand-written loop feeds: one PIL image at a time, converted and transformed."""

    def __init__(self, split, transform, mode: str) -> None:
        self.split, self.transform, self.mode = split, transform, mode

    def __len__(self) -> int:
        return len(self.split.indices)

    def __getitem__(self, index: int):
        source = int(self.split.indices[index])
        image = to_mode(self.split.images.load(source), self.mode)
        return self.transform(image), int(self.split.images.labels[source])


class ImageTargetPairs(Dataset):
    """A segmentation or detection dataset's samples as (image, mask) or (image, boxes)
    tuples, as a plain loop takes them."""

    def __init__(self, dataset, target: str) -> None:
        self.dataset, self.target = dataset, target

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        return sample["image"], sample[self.target]


def stack_images(samples):
    """Detection batches as a plain loop collates them: stacked images, a list of targets."""
    return torch.stack([image for image, _ in samples]), [target for _, target in samples]


def to_device(target, device: torch.device):
    if isinstance(target, torch.Tensor):
        return target.to(device)
    return [
        {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in t.items()}
        for t in target
    ]


def timed_batches(loader: DataLoader, limit: int, step, device: torch.device) -> float:
    """Images per second of ``step`` over the first ``limit`` batches, loading included."""
    images = 0
    started = time.perf_counter()
    for index, (x, y) in enumerate(loader):
        if index == limit:
            break
        step(x.to(device), to_device(y, device))
        images += len(x)
    sync(device)
    return images / (time.perf_counter() - started)


def run_plain(cfg, args: argparse.Namespace, fast: bool) -> dict[str, float]:
    """The hand-written loop: model, AdamW, cross-entropy, train steps, then evaluation."""
    device = torch.device(args.device)
    layout = torch.channels_last if fast else torch.contiguous_format
    bf16_eval = fast and native_bf16(args.device)
    bf16_train = fast and str(cfg.trainer.precision).startswith("bf16")
    torch.manual_seed(cfg.seed)
    data = build_datamodule(cfg)
    config = data.data_config
    transform = create_transform(  # timm's own eval transform, as a user would call it
        input_size=config["input_size"],
        interpolation=config["interpolation"],
        mean=config["mean"],
        std=config["std"],
        crop_pct=config["crop_pct"],
        crop_mode=config["crop_mode"],
    )
    collate = None
    if args.task == "segmentation":  # the same smp model and paired per-sample transforms
        train, test = (
            ImageTargetPairs(data.train_set, "mask"),
            ImageTargetPairs(data.test_set, "mask"),
        )
        model = build_segmenter(cfg.model, data.num_classes, cfg.task.decoder)
        criterion = SegmentationLoss(cfg.task.loss, cfg.task.ignore_index)
    elif args.task == "detection":  # the same torchvision detector and box-aware transforms
        train = ImageTargetPairs(data.train_set, "target")
        test = ImageTargetPairs(data.test_set, "target")
        model = build_detector(
            cfg.model,
            data.num_classes,
            cfg.task.detector,
            image_size=cfg.task.image_size,
            **cfg.task.options,
        )
        collate = stack_images
    else:
        train = PerSampleImages(data.train_set, transform, data.image_mode)
        test = PerSampleImages(data.test_set, transform, data.image_mode)
        model = build_classifier(cfg.model, num_classes=data.num_classes)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.loss.label_smoothing)
    model.to(device, memory_format=layout).train()
    for layer in model.backbone.modules():  # pretrained BatchNorm statistics stay fixed
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay
    )

    def train_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_train):
            x = x.contiguous(memory_format=layout)
            if args.task == "detection":  # the detector computes its own losses
                loss = detection_loss(model(x, y))
            else:
                loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    correct = []
    classes = data.num_classes
    boxes_map = (
        MeanAveragePrecision(backend="faster_coco_eval") if args.task == "detection" else None
    )
    confusion = torch.zeros(classes * classes, dtype=torch.long, device=device)

    @torch.inference_mode()
    def eval_step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_eval):
            logits = model(x.contiguous(memory_format=layout))
        if boxes_map is not None:  # what a detection test accumulates: mAP's inputs
            boxes_map.update(logits, y)
            return
        if args.task != "segmentation":
            correct.append((logits.argmax(1) == y).sum())
            return
        # What a segmentation evaluation reports (transferlab's too): the loss, and mIoU,
        # Dice and pixel accuracy from a confusion matrix over the labelled pixels.
        correct.append(criterion(logits.float(), y))
        labelled = y != cfg.task.ignore_index
        confusion.add_(
            torch.bincount(y[labelled] * classes + logits.argmax(1)[labelled], minlength=classes**2)
        )

    loader = DataLoader(train, batch_size=cfg.data.batch_size, shuffle=True, collate_fn=collate)
    train_rate = timed_batches(loader, args.steps, train_step, device)
    model.eval()
    loader = DataLoader(test, batch_size=cfg.data.eval_batch_size, collate_fn=collate)
    return {
        "train": train_rate,
        "eval": timed_batches(loader, args.eval_batches, eval_step, device),
    }


def measure(cfg, args: argparse.Namespace, path: str) -> dict[str, float]:
    if path == "transferlab":
        return run_transferlab(cfg)
    return run_plain(cfg, args, fast=path == "plain_fast")


def summarise(rows: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """Median images/s of every path and phase, and the median of the per-repeat ratios."""
    summary: dict[str, float] = {}
    for phase in ("train", "eval"):
        for path in PATHS:
            summary[f"{path}_{phase}_img_s"] = statistics.median(r[path][phase] for r in rows)
        for path in PATHS[1:]:
            ratios = [r["transferlab"][phase] / r[path][phase] for r in rows]
            summary[f"ratio_{phase}_vs_{path}"] = statistics.median(ratios)
    return {k: round(v, 3 if k.startswith("ratio") else 1) for k, v in summary.items()}


def print_table(summary: dict[str, float], title: str) -> None:
    print(f"\n{title}")
    print(f"{'images/s':<14}{'train':>10}{'eval':>10}")
    for path in PATHS:
        train, evaluate = summary[f"{path}_train_img_s"], summary[f"{path}_eval_img_s"]
        print(f"{path:<14}{train:>10.1f}{evaluate:>10.1f}")
    for path in PATHS[1:]:
        train, evaluate = summary[f"ratio_train_vs_{path}"], summary[f"ratio_eval_vs_{path}"]
        print(f"{'vs ' + path:<14}{train:>9.2f}x{evaluate:>9.2f}x")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", default="efficientnet_lite0", help="a conf/model option")
    parser.add_argument(
        "--task", choices=("classification", "segmentation", "detection"), default="classification"
    )
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="training steps per repeat")
    parser.add_argument("--eval-batches", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-results/overhead.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the transferlab path")
    args = parser.parse_args()
    args.steps = args.steps or (3 if args.tiny else 20)
    args.eval_batches = args.eval_batches or (1 if args.tiny else 8)
    args.repeats = args.repeats or (1 if args.tiny else 5)
    if args.tiny:
        args.batch_size, args.eval_batch_size = 16, 64
    return args


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args, Path(tmp))
        for path in () if args.tiny else PATHS:  # warm-up: first-use costs stay out
            measure(cfg, args, path)
        rows = []
        for repeat in range(args.repeats):
            order = PATHS if repeat % 2 == 0 else PATHS[::-1]  # A B C, then C B A: no drift bias
            rows.append({path: measure(cfg, args, path) for path in order})
            rows[-1]["load_avg_1min"] = os.getloadavg()[0]
            print(f"repeat {repeat + 1}/{args.repeats}: {json.dumps(rows[-1])}", flush=True)
    summary = summarise(rows)
    task = (
        f"{args.task}: {cfg.data.source} {cfg.data.image_size}px, {cfg.model.name}, {args.device}"
    )
    print_table(summary, f"{task}; batch {args.batch_size} (eval {args.eval_batch_size})")
    print(
        f"CPU: {cpu().describe()}; OMP_WAIT_POLICY: {os.environ.get('OMP_WAIT_POLICY', 'default')}"
    )
    result = {
        "task": task,
        "steps": args.steps,
        "eval_batches": args.eval_batches,
        "repeats": args.repeats,
        "overrides": args.overrides,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "cpu": cpu().describe(),
        **summary,
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
