"""Shuffling that depends on (seed, epoch) alone, not on how often a loader was iterated."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, drawn from ``seed`` and the epoch number.

    Lightning calls ``set_epoch`` before every training epoch, so a resumed run, a reloaded
    loader and a loader over cached features all see the same order as one uninterrupted run.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0) -> None:
        self.size = size
        self.seed = seed
        # For the loader: an iterator draws its workers' base seed from here, not from
        # torch's global generator, so the epoch's random draws (dropout, augmentation in
        # workers) depend on (seed, epoch) alone.
        self.loader_generator = torch.Generator()
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader_generator.manual_seed(2 * (self.seed * 1_000_003 + epoch) + 1)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def epoch_loader(
    dataset: Dataset, batch_size: int, seed: int, start_epoch: int = 0, **options: Any
) -> DataLoader:
    """A training loader shuffled by :class:`EpochShuffleSampler`.

    ``start_epoch``: the first epoch it serves (a resumed run's): Lightning creates the
    first epoch's iterator before it calls ``set_epoch``.
    """
    sampler = EpochShuffleSampler(len(dataset), seed, start_epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        generator=sampler.loader_generator,
        **options,
    )
