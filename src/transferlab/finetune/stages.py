"""Backbone stages from timm's own parameter grouping, so every architecture agrees.

Stage 0 is the stem, the last stage the top of the network; the new head is not a stage.
"""

from __future__ import annotations

from torch import nn


def backbone_stages(backbone: nn.Module) -> list[list[str]]:
    """Parameter names of each stage, bottom to top, from ``group_matcher(coarse=True)``.

    Models without a group matcher form a single stage. Every parameter is in exactly one
    stage.
    """
    from timm.models import group_parameters

    names = [name for name, _ in backbone.named_parameters()]
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        return [names]
    groups = group_parameters(backbone, matcher(coarse=True))
    stages = [list(groups[key]) for key in sorted(groups)]
    covered = [name for stage in stages for name in stage]
    if sorted(covered) != sorted(names):
        missing = sorted(set(names) - set(covered))
        raise RuntimeError(f"timm's grouping of {type(backbone).__name__} misses {missing[:3]}")
    return [stage for stage in stages if stage]


def stage_modules(backbone: nn.Module, stages: list[list[str]]) -> list[list[nn.Module]]:
    """For each stage, the modules whose own parameters all belong to it (BatchNorm etc.)."""
    owner = {name: i for i, stage in enumerate(stages) for name in stage}
    result: list[list[nn.Module]] = [[] for _ in stages]
    for module_name, module in backbone.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if not own:
            continue
        prefix = f"{module_name}." if module_name else ""
        ids = {owner[prefix + n] for n in own}
        if len(ids) == 1:
            result[ids.pop()].append(module)
    return result
