"""Gradient synchronisation: the part every backend shares for what it sends of the gradients and how it is counted.

``GradientSync`` holds, for one backend:

- metering: ``comm_timer`` (column C) and ``byte_counter`` (``bytes_per_iter``) and their read-and-reset;
- compression: the ``compressor`` (None: the backend's own float32 allreduce), the manual bucketed reduction
  (``reduce_gradients``, for paths that do not average during backward) and the compressor's checkpointed state;
- a communicating optimizer (1-bit Adam / LAMB, ``datkit.optim.communicating``) that reduces over workers itself,
  and its exchange's checkpointed state;
- non-finite checks (``train.nonfinite``; ``datkit/engine/nonfinite.py``): this worker's NaN/Inf noted before
  compression, and the averaged gradients' after it.

It talks to the other workers through the backend's ``collectives.Collectives``.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from datkit.compress import (
    ByteCounter,
    Compressor,
    CountingCollectives,
    GradientBuckets,
    gather_state,
    pick_state,
)

from .collectives import Collectives
from .comm_timer import CommTimer


def _sum64(t: torch.Tensor) -> torch.Tensor:
    """The float64 sum of ``t``: non-finite exactly when an element is NaN/Inf (float32/16 values cannot
    overflow a float64 sum), in one pass without a temporary the size of ``t``."""
    return t.sum(dtype=torch.float64)


class GradientSync:
    """Metering, compression, manual reduction and non-finite checks of one backend (see module docstring)."""

    def __init__(self, collectives: Collectives, device: torch.device, bucket_cap_mb: float = 25.0) -> None:
        self.collectives, self.device, self.bucket_cap_mb = collectives, device, bucket_cap_mb
        self.comm_timer = CommTimer()
        self.byte_counter = ByteCounter()
        self.compressor: Compressor | None = None
        self.comm_optimizer: Any = None  # an optimizer that reduces over workers itself (datkit.optim.communicating)
        self._buckets: GradientBuckets | None = None
        self._pre_nonfinite: torch.Tensor | None = None  # a NaN/Inf seen in local gradients before compression

    @property
    def world_size(self) -> int:
        return self.collectives.world_size

    # --- metering -------------------------------------------------------------------------------
    def comm_seconds(self) -> float:
        """Seconds of gradient communication since the last call (and reset the counter)."""
        return self.comm_timer.reset()

    def comm_bytes(self) -> float:
        """Bytes of gradient communication this worker sent since the last call (and reset the counter)."""
        return self.byte_counter.reset()

    def counting_collectives(self) -> CountingCollectives:
        """The backend's collectives, with every call's bytes added to ``byte_counter``."""
        return CountingCollectives(self.collectives, self.byte_counter)

    # --- non-finite steps -----------------------------------------------------------------------
    def note_gradients(self, flat: torch.Tensor) -> None:
        """Record whether this worker's local gradients ``flat`` hold a NaN/Inf, before they are compressed
        (no host synchronisation here; ``nonfinite`` reads the flag)."""
        bad = ~torch.isfinite(_sum64(flat))
        self._pre_nonfinite = bad if self._pre_nonfinite is None else self._pre_nonfinite | bad

    def nonfinite(self, params: Iterable[nn.Parameter], averaged_in_backward: bool) -> tuple[bool, bool]:
        """(this worker's local gradients held a NaN/Inf -- noted by ``note_gradients``, or read from ``.grad`` of
        ``params`` where it is still local --, the averaged gradients in ``.grad`` hold one). ``averaged_in_backward``:
        ``.grad`` holds the average already. Resets the local flag."""
        sums = [_sum64(p.grad) for p in params if p.grad is not None]
        grad_bad = not bool(torch.isfinite(torch.stack(sums).sum())) if sums else False
        local = bool(self._pre_nonfinite) if self._pre_nonfinite is not None else False
        self._pre_nonfinite = None
        if not averaged_in_backward:
            return local or grad_bad, False
        return local, grad_bad

    def drop_nonfinite_compression_state(self) -> None:
        """Error-feedback residuals that absorbed a NaN/Inf restart from zero (else every later step would
        carry it: the residual is added to the next gradient)."""
        residuals = getattr(self.compressor, "residuals", None) or {}
        for side in residuals.values():
            for key, r in list(side.items()):
                if not bool(torch.isfinite(r).all()):
                    side[key] = torch.zeros_like(r)

    # --- compression and communicating optimizers -----------------------------------------------
    def set_compressor(self, compressor: Compressor | None) -> None:
        """Reduce gradients with ``compressor`` (None: the backend's own float32 allreduce). Before ``setup``."""
        self.compressor = compressor
        if compressor is not None and self.world_size == 1 and self.collectives.rank == 0:
            print(f"datkit: compression {compressor.describe()} has no effect with 1 worker (nothing is communicated)",
                  flush=True)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> bool:
        """An optimizer with ``communicates = True`` (1-bit Adam / LAMB) gets the metered, timed collectives
        (``datkit.optim.communicating.Exchange``) and the gradients then stay local in backward and ``step``
        (``gradients_stay_local``). Returns whether it communicates. Called by the backends' ``setup``."""
        from datkit.optim.communicating import Exchange, communicates

        if not communicates(optimizer):
            return False
        optimizer.attach(Exchange(self.counting_collectives(), self.comm_timer))
        self.comm_optimizer = optimizer
        return True

    def gradients_stay_local(self) -> bool:
        """True when the optimizer does the reducing (``attach_optimizer``): no gradient averaging here."""
        return self.comm_optimizer is not None and self.world_size > 1

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """Manual path: average gradients over workers in buckets, compressed if a compressor is set.

        For backends (or ``dist.ddp=false``) that do not synchronise gradients during backward. Timed (C)
        and counted (bytes). Every worker must call it with the same parameters.
        """
        if self.world_size == 1 or self.gradients_stay_local():
            return
        if self._buckets is None:
            self._buckets = GradientBuckets(params, self.bucket_cap_mb)
        coll, m, comp = self.counting_collectives(), self.world_size, self.compressor
        start = time.perf_counter()
        if comp is None:
            self._buckets.reduce(lambda flat, key: coll.all_reduce(flat.div_(m)))
        else:
            def reduce(flat: torch.Tensor, key: str) -> torch.Tensor:
                self.note_gradients(flat)  # a NaN would come back from the codes as finite garbage
                return comp.reduce_mean(flat, coll, key)

            self._buckets.reduce(reduce)
        self.comm_timer.record(start)

    # --- checkpointed state ---------------------------------------------------------------------
    def compression_state(self) -> dict[str, Any] | None:
        """Collective: every worker's compressor state (error-feedback residuals), for rank 0's checkpoint."""
        if self.compressor is None:
            return None
        return gather_state(self.compressor.local_state(), self.collectives)

    def load_compression_state(self, saved: dict[str, Any] | None) -> None:
        """Give this worker its part of a ``compression_state`` back (a different world size starts from zero)."""
        mine = self._my_part(saved, self.compressor, "compression state", "error-feedback residuals")
        if mine is not None:
            self.compressor.load_local_state(mine)

    def optimizer_exchange_state(self) -> dict[str, Any] | None:
        """Collective: every worker's state of a communicating optimizer's exchange (its error-feedback residuals)."""
        if self.comm_optimizer is None:
            return None
        return gather_state(self.comm_optimizer.exchange_state(), self.collectives)

    def load_optimizer_exchange_state(self, saved: dict[str, Any] | None) -> None:
        """Give this worker its part of an ``optimizer_exchange_state`` back (another world size starts from zero)."""
        mine = self._my_part(saved, self.comm_optimizer, "optimizer exchange state",
                             "the 1-bit error-feedback residuals")
        if mine is not None:
            self.comm_optimizer.load_exchange_state(mine)

    def _my_part(self, saved: dict[str, Any] | None, owner: Any, what: str, residuals: str) -> dict[str, Any] | None:
        """This worker's entry of a gathered state for ``owner`` (None without an owner or a saved state); when the
        state does not fit this world size rank 0 says that ``residuals`` start from zero, and None is returned."""
        if owner is None or saved is None:
            return None
        rank = self.collectives.rank
        mine = pick_state(saved, rank, self.world_size, self.device)
        if mine is None and rank == 0:
            print(f"datkit: the checkpoint's {what} is for {saved.get('world_size')} workers, this run has "
                  f"{self.world_size}: {residuals} start from zero", flush=True)
        return mine
