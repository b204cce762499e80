"""1-bit (sign + scale) compression with error feedback on worker and server (1-bit Adam, EF-SignSGD).

Tang et al. 2021 ("1-bit Adam") and Karimireddy et al. 2019 ("Error feedback fixes SignSGD"): a worker
sends ``C(v) = s * sign(v)`` per block of ``block_size`` elements with ``s = mean |v|`` over the block
(the l1 scale of EF-SignSGD), keeping the error ``e <- v - C(v)`` and adding it to the next step's
gradient, ``v = g + e``. The server averages the M decoded chunks, adds its own error and compresses
again (always two-sided). Signs travel as packed bits (8 per byte): about 1/32 of float32's bytes plus
4 bytes per block. ``error_feedback=False`` gives plain scaled-sign compression (biased; for comparison).
"""
from __future__ import annotations

import torch

from .base import Compressor, Payload

_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """(R, c) -> (R, c/8) uint8, bit 1 where ``x >= 0`` (c must be a multiple of 8)."""
    bits = (x >= 0).to(torch.uint8).reshape(x.shape[0], -1, 8)
    return (bits << _SHIFTS.to(x.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor) -> torch.Tensor:
    """(R, c/8) uint8 -> (R, c) float32 of +1 / -1."""
    bits = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(packed.shape[0], -1).float() * 2 - 1


class OneBit(Compressor):
    """``onebit``: options ``error_feedback`` (bool, default True) and ``block_size`` (multiple of 8)."""

    name = "onebit"
    two_sided = True
    options = ("error_feedback", "block_size")

    def __init__(self, error_feedback: bool = True, block_size: int = 1024, seed: int = 0) -> None:
        super().__init__(seed=seed)
        if not isinstance(block_size, int) or block_size < 8 or block_size % 8:
            raise ValueError(f"onebit: block_size must be a positive multiple of 8, got {block_size!r}")
        self.error_feedback, self.block_size = bool(error_feedback), block_size
        self.worker_feedback = self.server_feedback = self.error_feedback
        self.align = block_size

    def compress(self, rows: torch.Tensor) -> Payload:
        r = rows.shape[0]
        scale = rows.reshape(r, -1, self.block_size).abs().mean(dim=-1)
        return pack_signs(rows), scale

    def decompress(self, payload: Payload) -> torch.Tensor:
        packed, scale = payload
        r = packed.shape[0]
        signs = unpack_signs(packed).reshape(r, -1, self.block_size)
        return (signs * scale.reshape(r, -1, 1)).reshape(r, -1)

    def describe(self) -> str:
        return f"onebit ({'error feedback' if self.error_feedback else 'no feedback'}, block {self.block_size})"
