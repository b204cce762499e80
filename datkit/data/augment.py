"""Data augmentation for in-memory tensor datasets (torchvision datasets use their transforms).

``random_shift``: translate each image by up to ``max_shift`` pixels in each direction (zero fill),
the standard MNIST augmentation; on the 5,000-image ``mnist5k`` it curbs robust overfitting.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from datkit import randomness


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random translation of a (B, C, H, W) batch by integers in [-max_shift, max_shift] (uniform).

    The shifts come from ``generator`` if given, else from ``datkit.randomness`` (keyed per sample in training)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s))
    if generator is None:  # per sample inside datkit.randomness.keyed (the trainer), else the global RNG
        u = randomness.rand((b, 2), torch.empty((), dtype=torch.float64))
    else:
        u = torch.rand((b, 2), generator=generator, dtype=torch.float64)
    d = (u * (2 * s + 1)).long().clamp_(max=2 * s).to(x.device)
    dy, dx = d[:, 0], d[:, 1]
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    out = padded[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
