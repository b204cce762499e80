"""Collectives: the small interface a compressor, a checkpoint and the trainer use to talk to the other workers.

On tensors of the backend's ``device``: ``all_reduce(t, op)`` in place (op "sum" | "mean" | "max" | "min"),
``all_gather(t)`` -> tensor of shape ``(world_size, *t.shape)``, ``all_to_all(t)`` -> row block ``j`` of dim 0 goes
to rank ``j`` (and block ``i`` of the result came from rank ``i``), ``broadcast(t, src)`` in place, ``barrier()``.

- ``Collectives``: one worker -- every call is a no-op (torchtitan's habit); the base of the others.
- ``DistCollectives``: the one implementation over torch.distributed *and* deepspeed.comm (which mirrors
  torch.distributed's API), the module passed in; on gloo, ``all_to_all``/``all_gather`` go receive-first
  point-to-point (``p2p_exchange``).
- ``horovod_collectives.HorovodCollectives``: Horovod's own.
"""
from __future__ import annotations

from typing import Any

import torch

from .p2p_exchange import p2p_all_gather, p2p_all_to_all

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}  # names in the comm module's ReduceOp


class Collectives:
    """The collectives of one worker (rank 0 of 1): every call returns at once."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(0)

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        return None


class DistCollectives(Collectives):
    """Collectives over ``comm``: ``torch.distributed`` or ``deepspeed.comm`` (the same functions and ``ReduceOp``).

    ``p2p``: all-to-all and all-gather as receive-first point-to-point messages (the group runs gloo,
    ``p2p_exchange.use_p2p_exchange``). With one worker every call is a no-op, as in ``Collectives``.
    """

    def __init__(self, comm: Any, rank: int, world_size: int, p2p: bool = False) -> None:
        super().__init__(rank, world_size)
        self.comm, self.p2p = comm, p2p

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        if op == "mean":
            self.comm.all_reduce(tensor)
            return tensor.div_(self.world_size)
        self.comm.all_reduce(tensor, op=getattr(self.comm.ReduceOp, _OPS[op]))
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        if self.p2p:
            return p2p_all_gather(tensor, self.rank, self.world_size)
        out = torch.empty(self.world_size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        self.comm.all_gather_into_tensor(out, tensor.contiguous().reshape(-1))  # gloo wants a flat output
        return out.view(self.world_size, *tensor.shape)

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        if self.p2p:
            return p2p_all_to_all(tensor, self.rank, self.world_size)
        out = torch.empty_like(tensor)
        self.comm.all_to_all_single(out, tensor.contiguous())
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            self.comm.broadcast(tensor, src)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            self.comm.barrier()
