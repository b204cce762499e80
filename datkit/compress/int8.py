"""8-bit quantization with one scale per block, one- or two-sided (DAT paper, Table 4).

Each block of ``block_size`` consecutive elements is sent as int8 codes plus one float32 scale
``s = max|x| / 127``; ``q = round(x / s)`` with deterministic (nearest) or stochastic rounding
(``floor(x / s + u)``, u ~ U[0, 1): unbiased, E[s q] = x). Per element the error is at most ``s / 2``
(nearest) or ``s`` (stochastic). One-sided: the server's float32 average comes back (bytes ~ (1 + 4/B)/8
+ 1/2 of float32's); two-sided: it is quantized again (bytes ~ (1 + 4/B)/4 of float32's).
"""
from __future__ import annotations

import torch

from .base import Compressor, Payload

ROUNDINGS = ("nearest", "stochastic")


class Int8(Compressor):
    """``int8``: options ``two_sided`` (bool), ``rounding`` (nearest | stochastic), ``block_size`` (int)."""

    name = "int8"
    options = ("two_sided", "rounding", "block_size")

    def __init__(self, two_sided: bool = False, rounding: str = "nearest", block_size: int = 256,
                 seed: int = 0) -> None:
        super().__init__(seed=seed)
        if rounding not in ROUNDINGS:
            raise ValueError(f"int8: rounding must be one of {', '.join(ROUNDINGS)}, got '{rounding}'")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"int8: block_size must be a positive integer, got {block_size!r}")
        self.two_sided, self.rounding, self.block_size = bool(two_sided), rounding, block_size
        self.align = block_size

    def compress(self, rows: torch.Tensor) -> Payload:
        r = rows.shape[0]
        blocks = rows.reshape(r, -1, self.block_size)
        scale = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        x = blocks / safe
        if self.rounding == "stochastic":
            x = torch.floor(x + torch.rand(x.shape, generator=self.generator(x.device), device=x.device))
        else:
            x = torch.round(x)
        codes = x.clamp_(-127, 127).to(torch.int8).reshape(r, -1)
        return codes, scale.reshape(r, -1)

    def decompress(self, payload: Payload) -> torch.Tensor:
        codes, scale = payload
        r = codes.shape[0]
        return (codes.float().reshape(r, -1, self.block_size) * scale.reshape(r, -1, 1)).reshape(r, -1)

    def describe(self) -> str:
        return f"int8 ({'two' if self.two_sided else 'one'}-sided, {self.rounding}, block {self.block_size})"
