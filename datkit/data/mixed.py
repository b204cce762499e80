"""Batches that mix labeled and pseudo-labeled examples in a fixed ratio (semi-supervised AT, ``datkit.semisup``).

The training set is laid out as ``[labeled (n_l); pseudo-labeled (n_u)]``. Every global batch of G examples
holds ``G_u = round(f * G)`` pseudo-labeled and ``G_l = G - G_u`` labeled ones (Carmon et al. 2019 use
f = 0.5); worker ``r`` of M takes slice ``r`` of each part (``G_l / M`` and ``G_u / M`` examples), so M
workers take exactly the step of one worker with the whole global batch, as with ``ShardedBatchSampler``.
An epoch is ``(n_l + n_u) // G`` steps (as many examples as the combined set); within it each part is
drawn pass after pass, every pass a new permutation seeded by (seed, epoch, part, pass), so the smaller
part repeats and an epoch depends only on its number (exact resume).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def _stream(n: int, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Global batches of ``batch`` indices below ``n``: pass after pass over seeded permutations (tails dropped)."""
    k = 0
    while True:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + k))
        for i in range(n // batch):
            yield perm[i * batch : (i + 1) * batch]
        k += 1


class MixedBatchSampler(Sampler[list[int]]):
    """This worker's index list of each mixed global batch of one epoch (call ``set_epoch`` first)."""

    def __init__(self, n_labeled: int, n_unlabeled: int, global_batch: int, unlabeled_fraction: float,
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        g_u = int(round(unlabeled_fraction * global_batch))
        g_l = global_batch - g_u
        if g_u <= 0 or g_l <= 0 or g_u % world_size or g_l % world_size:
            raise ValueError(f"a global batch of {global_batch} with unlabeled fraction {unlabeled_fraction} "
                             f"gives {g_l} labeled + {g_u} pseudo-labeled examples: both must be > 0 and divisible "
                             f"by {world_size}")
        if n_labeled < g_l or n_unlabeled < g_u:
            raise ValueError(f"{n_labeled} labeled / {n_unlabeled} pseudo-labeled examples are fewer than the "
                             f"{g_l} / {g_u} one global batch takes")
        self.n_labeled, self.n_unlabeled, self.global_batch = n_labeled, n_unlabeled, global_batch
        self.g_l, self.g_u, self.rank, self.world_size, self.seed, self.epoch = g_l, g_u, rank, world_size, seed, 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the permutations of ``epoch`` (the same on every worker); iteration begins at global batch
        ``start`` (a mid-epoch resume; the skipped batches' index draws are made, no example is read)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return (self.n_labeled + self.n_unlabeled) // self.global_batch

    def positions(self, step: int) -> list[int]:
        """Global positions in the epoch of this worker's examples at ``step`` (labeled slots ``0..G_l-1``, then
        pseudo-labeled ones), in the order ``__iter__`` yields them: the ids of ``datkit.randomness`` keys."""
        bl, bu = self.g_l // self.world_size, self.g_u // self.world_size
        start = step * self.global_batch
        return ([start + self.rank * bl + j for j in range(bl)]
                + [start + self.g_l + self.rank * bu + j for j in range(bu)])

    def __iter__(self) -> Iterator[list[int]]:
        base = (self.seed * 100_003 + self.epoch) * 2
        lab, unlab = _stream(self.n_labeled, self.g_l, base), _stream(self.n_unlabeled, self.g_u, base + 1)
        bl, bu = self.g_l // self.world_size, self.g_u // self.world_size
        for i in range(len(self)):
            gl, gu = next(lab), next(unlab)
            if i < self.start:
                continue
            mine_l = gl[self.rank * bl : (self.rank + 1) * bl]
            mine_u = gu[self.rank * bu : (self.rank + 1) * bu] + self.n_labeled
            yield torch.cat([mine_l, mine_u]).tolist()
