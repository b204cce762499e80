"""The ``torch`` backend: torch.distributed with gloo on CPU and NCCL on GPU, or a single process.

Launched by ``torchrun --nproc_per_node N -m datkit.train`` (multi-node: ``--nnodes`` with a
rendezvous) or plain ``python -m datkit.train`` (one process, no process group). Gradients are
averaged by DistributedDataParallel; a communication hook wraps DDP's allreduce so that the time
spent in gradient communication (column C) is measured while it overlaps the backward pass. With
``compression.name`` set, a compressed hook (``ddp_hooks.CompressedHook``) replaces the allreduce;
``dist.ddp=false`` uses the manual bucketed path of ``GradientSync.reduce_gradients``. Collectives:
``collectives.DistCollectives`` over ``torch.distributed``.
"""
from __future__ import annotations

import datetime
import os
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .base import Backend
from .collectives import DistCollectives
from .ddp_hooks import CompressedHook, local_gradients_hook, timed_allreduce_hook
from .device import bind_device, wants_cuda
from .elastic_group import init_group_for_attempt
from .p2p_exchange import use_p2p_exchange
from .spec import BackendSpec


class TorchBackend(Backend):
    """torch.distributed backend (see module docstring)."""

    name = "torch"

    def __init__(self, spec: BackendSpec) -> None:
        self.use_ddp, self.bucket_cap_mb = spec.dist.ddp, spec.dist.bucket_cap_mb
        want_cuda = wants_cuda(spec.device)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            init_group_for_attempt("nccl" if want_cuda else "gloo", datetime.timedelta(seconds=spec.dist.timeout_s))
        self._owns_group = dist.is_initialized()
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if self._owns_group else (0, 1)
        collectives = DistCollectives(dist, rank, world_size, p2p=self._owns_group and use_p2p_exchange())
        super().__init__(collectives, bind_device(want_cuda, local_rank), local_rank, local_world_size,
                         self.bucket_cap_mb)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = model.to(self.device)
        local = self.grads.attach_optimizer(optimizer)
        if self.world_size > 1 and self.use_ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            params = list(model.parameters())
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=self.bucket_cap_mb)
            hook = (local_gradients_hook if local else timed_allreduce_hook(self) if self.compressor is None
                    else CompressedHook(self, params).hook)
            model.register_comm_hook(None, hook)
        return model, optimizer

    def gradients_averaged_in_backward(self) -> bool:
        return self.world_size > 1 and self.use_ddp and not self.grads.gradients_stay_local()

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return super().no_sync(model)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.world_size > 1 and not self.use_ddp:
            self.grads.reduce_gradients([p for g in optimizer.param_groups for p in g["params"]])
        super().step(optimizer)

    def close(self) -> None:
        self.watch.stop()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False
