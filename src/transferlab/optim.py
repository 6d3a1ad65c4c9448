"""Parameter groups and learning-rate schedules (built by Hydra as partials)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

OptimizerFactory = Callable[[Iterable[dict]], Optimizer]
SchedulerFactory = Callable[..., LRScheduler]


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and normalisation weights (1-d tensors) get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias")


NamedParams = nn.Module | Iterable[tuple[str, nn.Parameter]]


def param_groups(parts: dict[str, tuple[NamedParams, float]]) -> list[dict]:
    """One decay and one no-decay group per named part, with its learning-rate multiplier.

    A part is a module or a list of ``(name, parameter)``. Frozen parameters are included
    too: they get no gradient, hence no optimizer state and no weight decay, until a
    strategy unfreezes them. Each group carries ``name`` and ``lr_mult``; ``apply_lr_mult``
    turns them into learning rates once the optimizer has filled in its defaults.
    """
    groups = []
    for group_name, (part, lr_mult) in parts.items():
        named = part.named_parameters() if isinstance(part, nn.Module) else part
        decay, no_decay = [], []
        for name, param in named:
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
    restarts: Sequence[int] = (),
) -> LambdaLR:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to ``min_lr_ratio`` of each lr.

    At each step in ``restarts`` (a new fine-tuning phase) the cycle starts again, warm-up
    included, and runs to the next restart or the end. The factor depends on the step alone,
    so a resumed run continues the same schedule.
    """
    total_steps = max(1, total_steps)
    bounds = [0, *sorted(r for r in restarts if 0 < r < total_steps), total_steps]
    warmup_steps = round(warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        index = max(i for i, start in enumerate(bounds[:-1]) if step >= start)
        start, end = bounds[index], bounds[index + 1]
        warmup = min(warmup_steps, (end - start) // 2)
        t = step - start
        if t < warmup:
            return (t + 1) / warmup
        progress = min(1.0, (t - warmup) / max(1, end - start - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def one_cycle(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    restarts: Sequence[int] = (),
) -> OneCycleLR:
    """One-cycle policy peaking at each group's own learning rate (one cycle: no restarts)."""
    del steps_per_epoch, restarts
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
