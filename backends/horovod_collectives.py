"""Horovod's collectives behind the ``collectives.Collectives`` interface.

``hvd.allreduce`` / ``allgather`` / ``alltoall`` / ``broadcast`` / ``barrier`` (int8/uint8 payloads work over gloo),
every call under a stable name (``_stable_name``); no-ops with one worker.
"""
from __future__ import annotations

from typing import Any

import torch

from .collectives import Collectives

_OPS = {"sum": "Sum", "max": "Max", "min": "Min"}


class HorovodCollectives(Collectives):
    """Collectives over ``hvd`` (``horovod.torch``, initialized)."""

    def __init__(self, hvd: Any, rank: int, world_size: int) -> None:
        super().__init__(rank, world_size)
        self.hvd = hvd

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        hop = getattr(self.hvd, _OPS["sum" if op == "mean" else op])
        name = _stable_name(f"allreduce.{op}", tensor)
        tensor.copy_(self.hvd.allreduce(tensor.detach().contiguous(), op=hop, name=name))
        return tensor.div_(self.world_size) if op == "mean" else tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        return self.hvd.allgather(tensor.detach().contiguous().unsqueeze(0),  # concatenated along dim 0
                                  name=_stable_name("allgather", tensor))

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        if tensor.shape[0] % self.world_size:
            raise ValueError(f"all_to_all: dim 0 ({tensor.shape[0]}) is not a multiple of the world size "
                             f"{self.world_size}")
        out = self.hvd.alltoall(tensor.detach().contiguous(), name=_stable_name("alltoall", tensor))  # equal splits
        return out[0] if isinstance(out, tuple) else out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            tensor.copy_(self.hvd.broadcast(tensor.detach().contiguous(), root_rank=src,
                                            name=_stable_name(f"broadcast.{src}", tensor)))
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            self.hvd.barrier()


def _stable_name(op: str, tensor: torch.Tensor) -> str:
    """The same name for the same collective on the same shape at every step. Horovod names an unnamed op uniquely
    (``allgather.noname.<n>``), so its response cache never hits and every call pays a full negotiation with the
    coordinator; a stable name lets the second and later steps agree by the cache's bit vector. The collectives here
    are synchronous (one in flight per process), so a name is never in use twice at once."""
    return f"datkit.{op}.{str(tensor.dtype).removeprefix('torch.')}.{'x'.join(map(str, tensor.shape)) or 'scalar'}"
