"""``PartsFacade``: the methods the rest of datkit calls on a backend that belong to its parts, each handed over.

The trainer, the evaluators and the benches call ``backend.all_reduce(...)``, ``backend.comm_bytes()``,
``backend.save_training_state(...)``; ``Backend`` (``base``) inherits these one-line hand-overs from here, so that
the abstract class itself stays small. A part's own documentation says what each call does:
``collectives.Collectives``, ``grad_sync.GradientSync``, ``checkpoint_io.CheckpointIO``,
``lost_worker.LostWorkerWatch``.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from datkit.compress import Compressor

    from .checkpoint_io import CheckpointIO
    from .collectives import Collectives
    from .grad_sync import GradientSync
    from .lost_worker import LostWorkerWatch


class PartsFacade:
    """Hand-overs to ``collectives``, ``grads``, ``checkpoint_io`` and ``watch`` (set by ``Backend.__init__``)."""

    name: str
    rank: int
    world_size: int
    collectives: Collectives
    grads: GradientSync
    checkpoint_io: CheckpointIO
    watch: LostWorkerWatch
    # and Backend's unwrap(model) and peer_store_address()

    # --- collectives, metering, compression state ---------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return self.collectives.all_reduce(tensor, op)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.collectives.all_gather(tensor)

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.collectives.all_to_all(tensor)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self.collectives.broadcast(tensor, src)

    def barrier(self) -> None:
        self.collectives.barrier()

    def set_compressor(self, compressor: Compressor | None) -> None:
        self.grads.set_compressor(compressor)

    def comm_seconds(self) -> float:
        return self.grads.comm_seconds()

    def comm_bytes(self) -> float:
        return self.grads.comm_bytes()

    def compression_state(self) -> dict[str, Any] | None:
        return self.grads.compression_state()

    def load_compression_state(self, saved: dict[str, Any] | None) -> None:
        self.grads.load_compression_state(saved)

    def optimizer_exchange_state(self) -> dict[str, Any] | None:
        return self.grads.optimizer_exchange_state()

    def load_optimizer_exchange_state(self, saved: dict[str, Any] | None) -> None:
        self.grads.load_optimizer_exchange_state(saved)

    # --- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, path: str, state: dict[str, Any]) -> None:
        self.checkpoint_io.save_checkpoint(path, state)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        return self.checkpoint_io.load_checkpoint(path)

    def save_training_state(self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                            run_state: dict[str, Any]) -> None:
        """Collective: checkpoint model + optimizer with the trainer's ``run_state`` at ``path``."""
        self.checkpoint_io.save_training_state(path, self.unwrap(model), optimizer, run_state)

    def load_training_state(self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore what ``save_training_state`` wrote (checked as untrusted input); returns the run state."""
        return self.checkpoint_io.load_training_state(path, self.name, self.unwrap(model), optimizer)

    # --- the lost-worker watch ------------------------------------------------------------------
    def start_peer_watch(self, peer_timeout_s: float, startup_timeout_s: float) -> None:
        self.watch.start(self.peer_store_address, self.rank, self.world_size, peer_timeout_s, startup_timeout_s)

    def fault_guard(self) -> AbstractContextManager[None]:
        return self.watch.fault_guard()

    def expect_exit(self) -> None:
        self.watch.expect_exit()

    def stop_peer_watch(self) -> None:
        self.watch.stop()

