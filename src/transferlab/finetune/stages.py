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
