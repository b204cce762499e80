"""The Backend interface: a small abstract class composed of parts, as Lightning Fabric's strategies are.

``Backend`` holds identity (rank, world size, device) and the model surface (``setup``, ``backward``, ``step``); each
backend composes the parts, one file each, and the methods of ``facade.PartsFacade`` hand over to them:

- ``collectives.Collectives`` -- ``all_reduce``/``all_gather``/``all_to_all``/``broadcast``/``barrier``, no-ops on one
  process; ``DistCollectives`` is the one implementation over torch.distributed and deepspeed.comm;
- ``grad_sync.GradientSync`` -- metering (C, bytes), compression, the manual bucketed reduction, non-finite checks;
- ``checkpoint_io.CheckpointIO`` -- checkpoint files and the format the backend writes;
- ``lost_worker.LostWorkerWatch`` -- the lost-worker watch (``peer_watch``) around training;
- ``device`` -- the device choice; ``spec.BackendSpec`` -- the configuration every constructor takes.

A backend that cannot do something raises a clear error. Nothing outside ``datkit.backends`` branches on which
backend is running.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from .checkpoint_io import CheckpointIO
from .collectives import Collectives
from .facade import PartsFacade
from .grad_sync import GradientSync
from .lost_worker import LostWorkerWatch, StoreAddress, env_store_address


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run here (not implemented yet, or its library is not installed)."""


class Backend(PartsFacade, ABC):
    """Rank/world size/device and the training surface; collectives, gradient synchronisation, checkpoints and the
    peer watch are the parts ``collectives``, ``grads``, ``checkpoint_io`` and ``watch`` (module docstring).

    A subclass starts its process group, then calls ``super().__init__`` with the parts it built."""

    name: str = "base"

    def __init__(self, collectives: Collectives | None = None, device: torch.device | None = None, local_rank: int = 0,
                 local_world_size: int = 1, bucket_cap_mb: float = 25.0,
                 checkpoint_io: CheckpointIO | None = None) -> None:
        self.collectives = collectives if collectives is not None else Collectives()
        self.device = device if device is not None else torch.device("cpu")
        self.local_rank, self.local_world_size = local_rank, local_world_size  # workers on this host: CPU threads
        self.grads = GradientSync(self.collectives, self.device, bucket_cap_mb)
        self.checkpoint_io = checkpoint_io if checkpoint_io is not None else CheckpointIO(self.collectives)
        self.watch = LostWorkerWatch()

    rank = property(lambda self: self.collectives.rank, doc="This worker's rank, 0 .. world_size - 1.")
    world_size = property(lambda self: self.collectives.world_size, doc="The number of workers.")
    is_main = property(lambda self: self.rank == 0, doc="True on rank 0, the rank that prints and writes files.")
    compressor = property(lambda self: self.grads.compressor, doc="The gradient compressor (None: float32 allreduce).")

    def describe(self) -> str:
        """One line for the log: backend, world size, device."""
        return f"backend={self.name} world_size={self.world_size} device={self.device}"

    # --- model and gradients --------------------------------------------------------------------
    @abstractmethod
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Move/wrap the model and optimizer for training; returns (wrapped model, optimizer)."""

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain model under any wrapper: attacks and bounds run on it."""
        return getattr(model, "module", model)

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Context for micro-batches whose gradients are accumulated locally (no communication)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass (gradient synchronisation happens here or in ``step``)."""
        loss.backward()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the (synchronised) gradient norm; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(self.unwrap(model).parameters(), max_norm))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step on synchronised gradients, then zero them."""
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def gradients_averaged_in_backward(self) -> bool:
        """True when ``.grad`` holds the averaged gradients after backward (DDP, Horovod's DistributedOptimizer,
        DeepSpeed's engine); False where they are reduced later, in ``step``, or never (one worker)."""
        return self.world_size > 1

    def nonfinite_gradients(self, model: nn.Module) -> tuple[bool, bool]:
        """After backward, before the step: (this worker's local gradients held a NaN/Inf, the averaged ones do)."""
        return self.grads.nonfinite(self.unwrap(model).parameters(), self.gradients_averaged_in_backward())

    def skip_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop this step's gradients without an optimizer step (``train.nonfinite=skip``)."""
        optimizer.zero_grad(set_to_none=True)
        self.grads.drop_nonfinite_compression_state()

    # --- lost workers ----------------------------------------------------------------------------
    def peer_store_address(self) -> StoreAddress | None:
        """(host, port, hosting rank) of a TCPStore every worker reaches, for the heart-beats; None = no watch."""
        return env_store_address(self.world_size)

    def close(self) -> None:
        """Tear down the process group (idempotent)."""
        self.watch.stop()
