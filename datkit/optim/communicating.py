"""The seam between an optimizer that communicates and the Backend.

Most optimizers see gradients the backend already averaged (DDP's hooks, Horovod's DistributedOptimizer,
DeepSpeed's engine, or ``GradientSync.reduce_gradients`` of the backends). A *communicating* optimizer (1-bit Adam /
1-bit LAMB, ``datkit.optim.onebit``) decides itself what crosses the network: the averaged gradient during its warm-up,
its compressed momentum afterwards. The contract, the same on every backend:

1. the optimizer says so with the class attribute ``communicates = True`` (a capability, not a name);
2. ``Backend.setup`` then leaves the gradients local (no DDP averaging -- DDP keeps a no-op hook --, no
   ``hvd.DistributedOptimizer``, DeepSpeed's ``enable_backward_allreduce = False``, no ``reduce_gradients``)
   and calls ``optimizer.attach(exchange)`` with an :class:`Exchange` over the backend's collectives;
3. in ``step`` the optimizer reduces through the exchange: every byte is counted (``bytes_per_iter``) and every
   second timed (column C) like the backend's own gradient traffic;
4. its per-worker state (the error-feedback residuals) travels in checkpoints through
   ``exchange_state()`` / ``load_exchange_state()``, gathered to rank 0 like a compressor's.
"""
from __future__ import annotations

import time
from typing import Any, Protocol, runtime_checkable

import torch

from datkit.compress import Compressor, CountingCollectives


class Exchange:
    """A backend's collectives as a communicating optimizer uses them: metered (bytes) and timed (C)."""

    def __init__(self, collectives: CountingCollectives, timer: Any) -> None:
        self.collectives, self.timer = collectives, timer

    @property
    def rank(self) -> int:
        return self.collectives.rank

    @property
    def world_size(self) -> int:
        return self.collectives.world_size

    def mean(self, flat: torch.Tensor) -> torch.Tensor:
        """Float32 allreduce-mean of ``flat`` in place (a ring allreduce: ``2 (M-1)/M`` of its bytes)."""
        if self.world_size == 1:
            return flat
        start = time.perf_counter()
        self.collectives.all_reduce(flat, op="sum").div_(self.world_size)
        self.timer.record(start)
        return flat

    def compressed_mean(self, compressor: Compressor, flat: torch.Tensor, key: str) -> torch.Tensor:
        """``compressor``'s sharded, error-feedback mean of ``flat`` (``Compressor.reduce_mean``)."""
        if self.world_size == 1:
            return flat
        start = time.perf_counter()
        out = compressor.reduce_mean(flat, self.collectives, key)
        self.timer.record(start)
        return out


@runtime_checkable
class CommunicatingOptimizer(Protocol):
    """What a backend needs of an optimizer with ``communicates = True`` (see the module docstring)."""

    communicates: bool

    def attach(self, exchange: Exchange) -> None: ...

    def exchange_state(self) -> dict[str, Any]: ...

    def load_exchange_state(self, state: dict[str, Any]) -> None: ...


def communicates(optimizer: Any) -> bool:
    """True for an optimizer that reduces over workers itself (the backend must leave gradients local)."""
    return bool(getattr(optimizer, "communicates", False))
