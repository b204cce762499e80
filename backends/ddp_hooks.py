"""DDP communication hooks of the torch backend: timed float32 allreduce, and compressed reduction.

Both record the [start, completion] interval of each bucket's communication in the backend's
``CommTimer`` (column C) and add its bytes to the backend's ``ByteCounter`` (``bytes_per_iter``).

The compressed hook hands each bucket to one background thread that runs the compressor's sharded
parameter-server exchange (``datkit.compress``) with blocking collectives, and returns a future that
thread completes: the backward pass keeps computing earlier layers' gradients meanwhile, so
communication overlaps backward as with DDP's own allreduce. One thread, first-in first-out: every
worker issues the buckets' collectives in DDP's bucket order, so they match across workers.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from datkit.compress import allreduce_bytes

if TYPE_CHECKING:
    from .base import Backend


def timed_allreduce_hook(backend: "Backend"):
    """Mean-allreduce of the bucket (DDP's default), timed and counted."""

    def hook(state, bucket):  # no annotations: DDP checks them against the real classes
        start = time.perf_counter()
        buf = bucket.buffer()
        backend.byte_counter.add(allreduce_bytes(buf.numel() * buf.element_size(), backend.world_size))
        buf.div_(backend.world_size)
        fut = dist.all_reduce(buf, async_op=True).get_future()

        def done(f: torch.futures.Future) -> torch.Tensor:
            backend.comm_timer.record(start)
            return f.value()[0]

        return fut.then(done)

    return hook


class CompressedHook:
    """DDP comm hook reducing each bucket with ``backend.compressor`` on a background thread."""

    def __init__(self, backend: "Backend", params: list[torch.nn.Parameter]) -> None:
        self.backend = backend
        self.index = {id(p): i for i, p in enumerate(params)}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datkit-compress")
        self.coll = backend.counting_collectives()

    def key(self, bucket) -> str:
        """Bucket key from its parameters' indices (residuals follow the same gradients across steps)."""
        return ",".join(str(self.index[id(p)]) for p in bucket.parameters())

    def hook(self, state, bucket):  # registered as the bound method (DDP wants a __name__)
        fut: torch.futures.Future = torch.futures.Future()
        buf, key = bucket.buffer(), self.key(bucket)

        def work() -> None:
            start = time.perf_counter()
            try:
                out = self.backend.compressor.reduce_mean(buf, self.coll, key)
                self.backend.comm_timer.record(start)
                fut.set_result(out)
            except BaseException as err:  # surfaces in the training thread when DDP waits
                fut.set_exception(err)

        self.pool.submit(work)
        return fut
