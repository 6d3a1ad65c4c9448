"""Freezing strategies: what trains, when, and how BatchNorm behaves."""

from transferlab.finetune.strategies import STRATEGIES, FinetuneStrategy, build_strategy

__all__ = ["STRATEGIES", "FinetuneStrategy", "build_strategy"]
