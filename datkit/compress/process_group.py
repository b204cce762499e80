"""``ProcessGroupCollectives``: the ``Collectives`` a compressor needs, on a ``torch.distributed`` process group.

The DDP hook of a user's own loop (``datkit.compress.ddp_hook.register_ddp_hook``) exchanges its compressed
buckets through it; datkit's backends bring their own ``Collectives``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class ProcessGroupCollectives:
    """The ``Collectives`` a compressor needs, on a ``torch.distributed`` process group (None: the default one).

    ``all_to_all(t)``: row block j of dim 0 goes to rank j (``all_to_all_single``); ``all_gather(t)`` ->
    ``(world_size, *t.shape)``; ``all_reduce(t, op)`` in place (op ``sum`` | ``mean`` | ``max`` | ``min``).
    Ranks are ranks within the group. On NCCL a CPU tensor (a rounding generator's state, when the state is
    gathered) travels through the current CUDA device and comes back on the CPU.
    """

    def __init__(self, process_group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("datkit.compress: torch.distributed is not initialized (call dist.init_process_group "
                               "before wrapping the model in DistributedDataParallel)")
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self._nccl = dist.get_backend(process_group) == "nccl"

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        if self._nccl and t.device.type == "cpu":
            return t.to(torch.device("cuda", torch.cuda.current_device()))
        return t

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        t = self._dev(tensor)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, "SUM" if op == "mean" else op.upper()), group=self.group)
        if op == "mean":
            t.div_(self.world_size)
        if t is not tensor:
            tensor.copy_(t)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        src = self._dev(tensor.contiguous().reshape(-1))  # gloo wants a flat output
        out = torch.empty(self.world_size * src.numel(), dtype=src.dtype, device=src.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # older torch: only the latter
        gather(out, src, group=self.group)
        return out.to(tensor.device).view(self.world_size, *tensor.shape)

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        src = self._dev(tensor.contiguous())
        out = torch.empty_like(src)
        dist.all_to_all_single(out, src, group=self.group)
        return out.to(tensor.device)
