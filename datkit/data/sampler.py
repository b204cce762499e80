"""Distributed sampling such that M workers with local batch B take the same step as 1 worker with M*B.

Every worker draws the same global permutation (seeded by ``seed`` and the epoch); global batch ``i``
is ``perm[i*G:(i+1)*G]`` and worker ``r`` takes the slice ``[r*B:(r+1)*B]`` of it (``B = G/M``).
With mean-reduced losses and gradient averaging across workers, the update equals the single-worker
update on the whole global batch. The last incomplete global batch is dropped.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields this worker's index list for each global batch of one epoch (call ``set_epoch`` first)."""

    def __init__(self, n: int, global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world_size {world_size}")
        if n < global_batch:
            raise ValueError(f"dataset of {n} examples is smaller than one global batch of {global_batch}")
        self.n, self.global_batch, self.rank, self.world_size = n, global_batch, rank, world_size
        self.local_batch = global_batch // world_size
        self.seed, self.shuffle, self.epoch, self.start = seed, shuffle, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the permutation of ``epoch`` (same on every worker); iteration begins at global batch ``start``
        (a mid-epoch resume: the earlier batches are neither yielded nor read). ``len`` stays the epoch's."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // self.global_batch

    def positions(self, step: int) -> list[int]:
        """Global positions in the epoch (``step*G + slot``) of this worker's examples at ``step``: the ids of
        ``datkit.randomness`` keys, the same for a sample whichever worker holds it."""
        start = step * self.global_batch + self.rank * self.local_batch
        return list(range(start, start + self.local_batch))

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        lo = self.rank * self.local_batch
        for i in range(self.start, len(self)):
            yield perm[i * self.global_batch + lo : i * self.global_batch + lo + self.local_batch].tolist()


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Indices ``rank, rank+M, ...`` below ``n``: evaluation shards that cover every example exactly once."""
    return range(rank, n, world_size)
