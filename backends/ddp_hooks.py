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

    def canonical(self, bucket) -> tuple[str, list[tuple[int, int]] | None]:
        """Key and layout of a bucket in parameter-index order.

        DDP rebuilds its buckets after the first iteration in the order gradients became ready, and a
        resumed run starts again from the initial order. Reducing each bucket with its parameters sorted
        by index keeps the key and the flat layout of the error-feedback residuals the same in both
        orders (whenever the rebuilt buckets hold the same parameters, e.g. one bucket, or a sequential
        model). Returns the key and, when the order differs, the (offset, numel) slices in sorted order.
        """
        params = bucket.parameters()
        idx = [self.index[id(p)] for p in params]
        order = sorted(range(len(idx)), key=idx.__getitem__)
        key = ",".join(str(idx[i]) for i in order)
        if order == list(range(len(idx))):
            return key, None
        offsets, pos = [], 0
        for p in params:
            offsets.append((pos, p.numel()))
            pos += p.numel()
        return key, [offsets[i] for i in order]

    def hook(self, state, bucket):  # registered as the bound method (DDP wants a __name__)
        fut: torch.futures.Future = torch.futures.Future()
        buf = bucket.buffer()
        self.backend.note_gradients(buf)  # before compression: a NaN would come back from the codes as garbage
        key, slices = self.canonical(bucket)

        def work() -> None:
            start = time.perf_counter()
            try:
                flat = buf if slices is None else torch.cat([buf[o:o + n] for o, n in slices])
                out = self.backend.compressor.reduce_mean(flat, self.coll, key)
                if slices is not None:
                    back, pos = torch.empty_like(buf), 0
                    for o, n in slices:
                        back[o:o + n] = out[pos:pos + n]
                        pos += n
                    out = back
                self.backend.comm_timer.record(start)
                fut.set_result(out)
            except BaseException as err:  # surfaces in the training thread when DDP waits
                fut.set_exception(err)

        self.pool.submit(work)
        return fut
