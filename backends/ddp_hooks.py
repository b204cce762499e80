"""DDP communication hooks of the torch backend: timed float32 allreduce, and compressed reduction.

Both record the [start, completion] interval of each bucket's communication in the backend's
``CommTimer`` (column C) and add its bytes to the backend's ``ByteCounter`` (``bytes_per_iter``), both held by its
``grad_sync.GradientSync``.

The hooks themselves are ``datkit.compress.ddp_hook.DDPCompressionHook`` -- the one implementation, which
``datkit.compress.register_ddp_hook`` also registers in a user's own DDP loop --; this module hands it the
backend's compressor, collectives (``collectives.DistCollectives``: receive-first point-to-point on gloo,
``p2p_exchange``), byte counter, timer and non-finite gradient check. The compressed hook runs the compressor's
sharded parameter-server exchange on one background thread (first in, first out, so every worker issues the
buckets' collectives in DDP's bucket order) and returns a future that thread completes: communication overlaps
backward.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from datkit.compress.ddp_hook import DDPCompressionHook

if TYPE_CHECKING:
    from .base import Backend


def timed_allreduce_hook(backend: Backend) -> Callable:
    """Mean-allreduce of the bucket (DDP's default) on the default group, timed and counted."""
    grads = backend.grads
    return DDPCompressionHook(None, backend.collectives, byte_counter=grads.byte_counter, timer=grads.comm_timer,
                              note_gradients=grads.note_gradients).hook


def local_gradients_hook(state, bucket):  # DDP rejects string annotations on a hook
    """No communication: the bucket keeps this worker's gradients (a communicating optimizer reduces in ``step``)."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class CompressedHook(DDPCompressionHook):
    """DDP comm hook reducing each bucket with ``backend.compressor`` on a background thread (register ``.hook``)."""

    def __init__(self, backend: Backend, params: list[torch.nn.Parameter]) -> None:
        grads = backend.grads
        if grads.compressor is None:
            raise ValueError("CompressedHook needs a backend with a compressor (set_compressor)")
        super().__init__(grads.compressor, backend.collectives, params, byte_counter=grads.byte_counter,
                         timer=grads.comm_timer, note_gradients=grads.note_gradients)
        self.backend = backend
