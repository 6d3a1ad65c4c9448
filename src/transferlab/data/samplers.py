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

    Under DDP rank r of N takes positions r, r + N, ... of the epoch's permutation (the
    same on every rank), the last few repeated from its start so that every rank has as
    many batches: the ranks' shards together are the split.
    """

    def __init__(self, size: int, seed: int, epoch: int = 0) -> None:
        from transferlab.distributed import world

        self.size = size
        self.seed = seed
        self.rank, self.world_size = world()
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
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.world_size == 1:
            return iter(order)
        total = len(self) * self.world_size
        padded = (order * (total // self.size + 1))[:total]
        return iter(padded[self.rank :: self.world_size])

    def __len__(self) -> int:
        return -(-self.size // self.world_size)


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block [start, stop) of ``size`` items split in
    ``world_size`` blocks whose lengths differ by at most one."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class ShardSampler(Sampler[int]):
    """One rank's contiguous block of a split, in order, none repeated: what the ranks
    accumulate, gathered in rank order, is the split in its own order (the reports'
    images line up with their predictions)."""

    def __init__(self, size: int, rank: int, world_size: int) -> None:
        self.start, self.stop = shard_bounds(size, rank, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def eval_loader(dataset: Dataset, batch_size: int, **options: Any) -> DataLoader:
    """A validation or test loader in the split's order; under DDP each rank takes its
    :class:`ShardSampler` block, so metrics synced over the ranks count each item once."""
    from transferlab.distributed import world

    rank, size = world()
    sampler = ShardSampler(len(dataset), rank, size) if size > 1 else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, **options)


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
