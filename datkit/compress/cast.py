"""No compression and 16-bit casts, on the sharded parameter-server exchange.

- ``none``: float32 both ways. Sends 2(M-1)/M of the gradient, like a ring allreduce, and sums in rank
  order, so the result is bit-for-bit the exact mean ``(g_0 + g_1 + ... + g_{M-1}) / M``.
- ``fp16`` / ``bf16``: the chunk travels as a 16-bit float both ways (the aggregate is rounded again
  on the way back), half of the float32 bytes. Relative rounding error per element: 2^-11 (fp16,
  normal range |x| in [6.1e-5, 65504]) and 2^-8 (bf16, float32's range), once per direction, so
  ``|out - mean| <= u * mean_i |g_i| + u * |mean| (1 + u)`` with u the unit roundoff.
"""
from __future__ import annotations

import torch

from .base import Compressor, Payload


class NoCompression(Compressor):
    """``none``: float32 payload, exact mean (see module docstring)."""

    name = "none"
    two_sided = False

    def compress(self, rows: torch.Tensor) -> Payload:
        return (rows,)

    def decompress(self, payload: Payload) -> torch.Tensor:
        return payload[0].float()


class CastCompressor(Compressor):
    """Cast to a 16-bit float on the way out and on the way back (see module docstring)."""

    dtype: torch.dtype = torch.float16

    def compress(self, rows: torch.Tensor) -> Payload:
        return (rows.to(self.dtype),)

    def decompress(self, payload: Payload) -> torch.Tensor:
        return payload[0].float()


class FP16(CastCompressor):
    """``fp16``: IEEE half precision (values beyond 65504 overflow to inf: scale losses accordingly)."""

    name = "fp16"
    dtype = torch.float16


class BF16(CastCompressor):
    """``bf16``: bfloat16 (float32's exponent range, 8 bits of mantissa)."""

    name = "bf16"
    dtype = torch.bfloat16
