"""Benchmark: memory format and precision of the backbone alone, step by step.

    python scripts/bench_formats.py                   # lite0, 64 px, 15 rounds
    python scripts/bench_formats.py --image-size 128
    python scripts/bench_formats.py --tiny            # seconds: resnet18, 32 px, 2 rounds

Three copies of the same network (NCHW fp32, channels_last fp32, channels_last with bf16
autocast) take one training step, or one inference batch, in turn (A B C, then C B A, ...),
so that a busy machine slows all three alike; the medians of the per-round speed-ups over
NCHW fp32 are reported. This is the evidence behind trainer.memory_format and
trainer.eval_precision.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from transferlab.models import build_classifier

VARIANTS = {
    "nchw_fp32": (torch.contiguous_format, False),
    "channels_last_fp32": (torch.channels_last, False),
    "channels_last_bf16": (torch.channels_last, True),
}
MODELS = {
    "efficientnet_lite0": {"name": "tf_efficientnet_lite0", "weights": "package"},
    "resnet18": {"name": "resnet18", "pretrained": False},
}


def network(model: str, layout: torch.memory_format) -> nn.Module:
    torch.manual_seed(0)
    net = build_classifier(MODELS[model], num_classes=10).to(memory_format=layout)
    for layer in net.modules():  # the default finetune.bn=eval
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()
    return net


def steps(model: str, size: int, batch: int, eval_batch: int) -> dict[str, dict[str, Callable]]:
    """For each variant, a training step and an inference batch, each returning images/s."""
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    x_eval = torch.randn(eval_batch, 3, size, size)
    result = {}
    for name, (layout, bf16) in VARIANTS.items():
        net = network(model, layout)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def train(net=net, optimizer=optimizer, layout=layout, bf16=bf16) -> float:
            started = time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = nn.functional.cross_entropy(net(x.contiguous(memory_format=layout)), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return len(x) / (time.perf_counter() - started)

        @torch.inference_mode()
        def infer(net=net, layout=layout, bf16=bf16) -> float:
            started = time.perf_counter()
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                net.eval()(x_eval.contiguous(memory_format=layout))
            net.train()
            return len(x_eval) / (time.perf_counter() - started)

        result[name] = {"train": train, "inference": infer}
    return result


def alternate(step_of: dict[str, Callable], rounds: int) -> dict[str, float]:
    """Median images/s of each variant and median per-round speed-up over NCHW fp32."""
    for step in step_of.values():  # warm-up: oneDNN builds its kernels on first use
        step()
    rates: dict[str, list[float]] = {name: [] for name in step_of}
    for index in range(rounds):
        order = list(step_of) if index % 2 == 0 else list(step_of)[::-1]
        for name in order:
            rates[name].append(step_of[name]())
    summary = {}
    for name, values in rates.items():
        summary[f"{name}_img_s"] = round(statistics.median(values), 1)
        ratios = [a / b for a, b in zip(values, rates["nchw_fp32"], strict=True)]
        summary[f"{name}_speedup"] = round(statistics.median(ratios), 2)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--model", choices=sorted(MODELS), default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-results/formats.json"))
    args = parser.parse_args()
    model = args.model or ("resnet18" if args.tiny else "efficientnet_lite0")
    size = args.image_size or (32 if args.tiny else 64)
    rounds = args.rounds or (2 if args.tiny else 15)
    batch, eval_batch = (8, 16) if args.tiny else (32, 256)

    step_of = steps(model, size, batch, eval_batch)
    result: dict[str, object] = {"model": model, "image_size": size, "rounds": rounds}
    print(f"{model}, {size} px, batch {batch} (inference {eval_batch}): images/s (speed-up)")
    for phase in ("train", "inference"):
        summary = alternate({name: s[phase] for name, s in step_of.items()}, rounds)
        result[phase] = summary
        cells = [
            f"{n} {summary[f'{n}_img_s']:.0f} ({summary[f'{n}_speedup']:.2f}x)" for n in VARIANTS
        ]
        print(f"{phase:<10} " + ", ".join(cells), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
