"""Parameter groups and learning-rate schedules (built by Hydra as partials)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

OptimizerFactory = Callable[[Iterable[dict]], Optimizer]
SchedulerFactory = Callable[..., LRScheduler]


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and normalisation weights (1-d tensors) get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(
    modules: dict[str, tuple[nn.Module, float]],
) -> list[dict]:
    """One decay and one no-decay group per named module, with its learning-rate multiplier.

    Only trainable parameters are included, so frozen ones get no optimizer state. Each
    group carries ``name`` and ``lr_mult``; ``apply_lr_mult`` turns them into learning rates
    once the optimizer has filled in its defaults.
    """
    groups = []
    for group_name, (module, lr_mult) in modules.items():
        decay, no_decay = [], []
        for name, param in module.named_parameters():
            if param.requires_grad:
                (no_decay if _is_no_decay(name, param) else decay).append(param)
        if decay:
            groups.append({"params": decay, "name": group_name, "lr_mult": lr_mult})
        if no_decay:
            groups.append(
                {
                    "params": no_decay,
                    "name": f"{group_name}_no_decay",
                    "lr_mult": lr_mult,
                    "weight_decay": 0.0,
                }
            )
    return groups


def apply_lr_mult(optimizer: Optimizer) -> None:
    """Scale each group's learning rate by its ``lr_mult`` (once, before any scheduler)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_mult", 1.0)
        group["initial_lr"] = group["lr"]


def cosine_with_warmup(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to ``min_lr_ratio`` of each lr."""
    total_steps = max(1, total_steps)
    warmup = min(round(warmup_epochs * steps_per_epoch), total_steps // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def one_cycle(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> OneCycleLR:
    """One-cycle policy peaking at each group's own learning rate."""
    del steps_per_epoch
    max_lrs = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(
        optimizer,
        max_lr=max_lrs,
        total_steps=max(2, total_steps),
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        cycle_momentum=isinstance(optimizer, torch.optim.SGD),
    )
