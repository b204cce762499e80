"""The ``torch`` backend: torch.distributed with gloo on CPU and NCCL on GPU, or a single process.

Launched by ``torchrun --nproc_per_node N -m datkit.train`` (multi-node: ``--nnodes`` with a
rendezvous) or plain ``python -m datkit.train`` (one process, no process group). Gradients are
averaged by DistributedDataParallel; a communication hook wraps DDP's allreduce so that the time
spent in gradient communication (column C) is measured while it overlaps the backward pass. With
``compression.name`` set, a compressed hook (``ddp_hooks.CompressedHook``) replaces the allreduce;
``dist.ddp=false`` uses the manual bucketed path of ``Backend.reduce_gradients``.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import nn

from .base import Backend
from .elastic_group import init_group_for_attempt
from .p2p_exchange import p2p_all_gather, p2p_all_to_all, use_p2p_exchange
from .ddp_hooks import CompressedHook, local_gradients_hook, timed_allreduce_hook

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class TorchBackend(Backend):
    """torch.distributed backend (see module docstring)."""

    name = "torch"

    def __init__(self, device: str = "auto", timeout_s: int = 600, ddp: bool = True, bucket_cap_mb: float = 25.0) -> None:
        super().__init__()
        self.use_ddp, self.bucket_cap_mb = ddp, bucket_cap_mb
        want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but no CUDA device is available (use device=cpu or auto)")
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            init_group_for_attempt("nccl" if want_cuda else "gloo", datetime.timedelta(seconds=timeout_s))
        self._owns_group = dist.is_initialized()
        if self._owns_group:
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._p2p_exchange = self._owns_group and use_p2p_exchange()
        if want_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = model.to(self.device)
        local = self.attach_optimizer(optimizer)
        if self.world_size > 1 and self.use_ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            params = list(model.parameters())
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=self.bucket_cap_mb)
            hook = (local_gradients_hook if local else timed_allreduce_hook(self) if self.compressor is None
                    else CompressedHook(self, params).hook)
            model.register_comm_hook(None, hook)
        return model, optimizer

    def gradients_averaged_in_backward(self) -> bool:
        return self.world_size > 1 and self.use_ddp and not self.gradients_stay_local()

    def no_sync(self, model: nn.Module) -> ContextManager[Any]:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return super().no_sync(model)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.world_size > 1 and not self.use_ddp:
            self.reduce_gradients([p for g in optimizer.param_groups for p in g["params"]])
        super().step(optimizer)

    # --- collectives ----------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        if op == "mean":
            dist.all_reduce(tensor)
            return tensor.div_(self.world_size)
        dist.all_reduce(tensor, op=_OPS[op])
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        if self._p2p_exchange:
            return p2p_all_gather(tensor, self.rank, self.world_size)
        out = torch.empty(self.world_size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather_into_tensor(out, tensor.contiguous().reshape(-1))  # gloo wants a flat output
        return out.view(self.world_size, *tensor.shape)

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        if self._p2p_exchange:
            return p2p_all_to_all(tensor, self.rank, self.world_size)
        out = torch.empty_like(tensor)
        dist.all_to_all_single(out, tensor.contiguous())
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(tensor, src)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        self.stop_peer_watch()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False
