"""Gradient buckets for the manual reduction path (backends without DDP's own bucketing).

Parameters are grouped, last layer first (the order in which backward produces gradients, as DDP
does), into buckets of at most ``cap_mb`` megabytes, so that communication is a few large messages.
A bucket's key lists its parameters' indices: error-feedback residuals stay attached to the same
gradients across steps and across a checkpoint/resume.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class GradientBuckets:
    """Fixed grouping of ``params`` into flat buckets (see module docstring)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], cap_mb: float = 25.0) -> None:
        self.params = [p for p in params if p.requires_grad]
        cap = max(1, int(cap_mb * 1024 * 1024))
        self.buckets: list[list[int]] = []
        current: list[int] = []
        size = 0
        for i in reversed(range(len(self.params))):
            nbytes = self.params[i].numel() * 4
            if current and size + nbytes > cap:
                self.buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            self.buckets.append(current)

    @staticmethod
    def key(indices: Sequence[int]) -> str:
        """Bucket key from parameter indices, e.g. ``"5,4,3"``."""
        return ",".join(str(i) for i in indices)

    def reduce(self, reduce_flat: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
        """Replace every gradient by ``reduce_flat(flat_bucket, key)`` of its bucket (missing grads = 0)."""
        for idx in self.buckets:
            ps = [self.params[i] for i in idx]
            for p in ps:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1).float() for p in ps])
            out = reduce_flat(flat, self.key(idx))
            offset = 0
            for p in ps:
                k = p.numel()
                p.grad.copy_(out[offset:offset + k].view_as(p.grad))
                offset += k
