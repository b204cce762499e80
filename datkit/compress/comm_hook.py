"""``DDPCompressionHook``: a DDP communication hook that averages each gradient bucket with a datkit compressor.

The one implementation of datkit's DDP hooks: ``register_ddp_hook`` (``datkit.compress.ddp_hook``, a user's own DDP
loop) and the torch backend (``backends/ddp_hooks.py``) build this class, each with its own compressor,
collectives, byte counter and timer.

How a bucket travels: the hook hands it to ONE background thread (first in, first out) that runs the
exchange with blocking collectives and completes the future DDP waits for at the end of backward, so the
exchange overlaps the backward pass of earlier layers as DDP's own allreduce does. Every worker issues
the buckets' collectives in DDP's bucket order, so they match across workers. Buckets are reduced with
their parameters in parameter-index order (``canonical``), so that error-feedback residuals stay attached
to the same gradients after DDP rebuilds its buckets (after the first iteration) and across a resume.
"""
from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .accounting import ByteCounter, CountingCollectives, allreduce_bytes
from .base import Collectives, Compressor
from .state import gather_state, pick_state
from .timing import CommIntervals, IntervalRecorder


class DDPCompressionHook:
    """A DDP communication hook: each gradient bucket reduced (averaged over workers) by ``compressor``.

    Args:
        compressor: a ``datkit.compress.Compressor`` (its sharded parameter-server exchange, on one background
            thread), or None for DDP's float32 mean-allreduce (``buffer / M`` summed by ``dist.all_reduce``,
            asynchronously, on ``process_group``).
        collectives: the raw ``Collectives`` of the exchange (rank, world size, ``all_to_all``, ``all_gather``);
            the hook counts their bytes through a ``CountingCollectives`` wrapper. ``state_dict`` gathers
            residuals over them uncounted.
        params: the model's parameters in ``module.parameters()`` order (a bucket's key and layout are built
            from their indices; only needed with a compressor).
        byte_counter: where every collective's modelled bytes are added (default: a new ``ByteCounter``).
        timer: where each bucket's [start, completion] interval is recorded (default: a new ``CommIntervals``).
        note_gradients: called with each bucket's flat local gradient before it is compressed or allreduced
            (datkit's backend flags NaN/Inf there: after a codec -- int8/onebit spread it over a block through the
            scale; a codec without a scale may turn it into finite garbage -- or a mean, every worker has it, whoever's
            it was).
        process_group: the group of the float32 allreduce (compressor None); None: the default group.

    Register ``hook`` with ``ddp_model.register_comm_hook(None, h.hook)`` (or ``h.register(ddp_model)``).
    """

    def __init__(self, compressor: Compressor | None, collectives: Collectives, params: Sequence[nn.Parameter] = (), *,
                 byte_counter: ByteCounter | None = None, timer: IntervalRecorder | None = None,
                 note_gradients: Callable[[torch.Tensor], None] | None = None, process_group: Any = None) -> None:
        self.compressor = compressor
        self.collectives = collectives
        self.byte_counter = byte_counter if byte_counter is not None else ByteCounter()
        self.timer = timer if timer is not None else CommIntervals()
        self.note_gradients = note_gradients
        self.process_group = process_group
        self.index = {id(p): i for i, p in enumerate(params)}
        self.device = params[0].device if len(params) else torch.device("cpu")
        self.coll = CountingCollectives(collectives, self.byte_counter)
        self.pool: ThreadPoolExecutor | None = None
        if compressor is not None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="datkit-compress")
        self.hook = self._compressed_hook if compressor is not None else self._allreduce_hook
        self._closed = False
        self._lock = threading.Lock()
        self._bytes = 0.0  # drained from byte_counter by bytes_sent()

    # --- registering -------------------------------------------------------------------------------
    def register(self, ddp_model: nn.parallel.DistributedDataParallel) -> DDPCompressionHook:
        """``ddp_model.register_comm_hook(None, self.hook)`` (once per model, before the first backward)."""
        ddp_model.register_comm_hook(None, self.hook)
        return self

    # --- the hooks (no annotations: DDP checks them against the real classes) ---------------------------
    def _allreduce_hook(self, state, bucket):
        """Mean-allreduce of the bucket (DDP's default), timed and counted: 2 (M-1)/M of its bytes."""
        self._check_open()
        start = time.perf_counter()
        buf = bucket.buffer()
        if self.note_gradients is not None:
            self.note_gradients(buf)  # this worker's NaN/Inf, before the mean hides whose it was
        m = self.collectives.world_size
        self.byte_counter.add(allreduce_bytes(buf.numel() * buf.element_size(), m))
        buf.div_(m)
        fut = dist.all_reduce(buf, group=self.process_group, async_op=True).get_future()

        def done(f: torch.futures.Future) -> torch.Tensor:
            self.timer.record(start)
            return f.value()[0]

        return fut.then(done)

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

    def _compressed_hook(self, state, bucket):
        """Hand the bucket to the background thread; returns the future it completes with the mean."""
        self._check_open()
        fut: torch.futures.Future = torch.futures.Future()
        buf = bucket.buffer()
        if self.note_gradients is not None:
            self.note_gradients(buf)  # before compression: a NaN would come back from the codes as garbage
        key, slices = self.canonical(bucket)
        compressor = self.compressor
        assert compressor is not None and self.pool is not None

        def work() -> None:
            start = time.perf_counter()
            try:
                flat = buf if slices is None else torch.cat([buf[o:o + n] for o, n in slices])
                out = compressor.reduce_mean(flat, self.coll, key)
                if slices is not None:
                    back, pos = torch.empty_like(buf), 0
                    for o, n in slices:
                        back[o:o + n] = out[pos:pos + n]
                        pos += n
                    out = back
                self.timer.record(start)
                fut.set_result(out)
            except BaseException as err:  # noqa: BLE001 -- surfaces in the training thread when DDP waits
                fut.set_exception(err)

        self.pool.submit(work)
        return fut

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("datkit.compress: this DDP hook was closed; a DDP model cannot unregister its comm "
                               "hook, so close() only after the last backward pass")

    # --- accounting --------------------------------------------------------------------------------
    def bytes_sent(self) -> float:
        """Bytes this worker sent in gradient communication since registration (or ``reset_counters``): every
        collective's payload by the ring model of ``datkit.compress.accounting`` (all_to_all (M-1)/M of its
        input, all_gather (M-1) times its input, allreduce 2 (M-1)/M), scales and padding included. Moves what
        ``byte_counter`` holds into this running total."""
        with self._lock:
            self._bytes += self.byte_counter.reset()
            return self._bytes

    def comm_seconds(self) -> float:
        """Seconds during which gradient communication was in flight since registration (or ``reset_counters``):
        the union of the buckets' [start, completion] intervals (needs a timer with ``total()``)."""
        return float(self.timer.total())  # type: ignore[attr-defined]

    def reset_counters(self) -> tuple[float, float]:
        """``(bytes_sent(), comm_seconds())`` since the last reset, then both start again from zero."""
        nbytes = self.bytes_sent()
        seconds = float(self.timer.reset())  # type: ignore[attr-defined]
        with self._lock:
            self._bytes = 0.0
        return nbytes, seconds

    # --- state (error-feedback residuals, rounding generator) -------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Collective (every worker calls it, between iterations): every worker's compressor state --
        error-feedback residuals per bucket and the stochastic-rounding generator -- gathered to one dict
        ``{"world_size": M, "ranks": [...]}`` of CPU tensors (``datkit.compress.state``), for rank 0 to save.
        Stateless compressors (nearest-rounding int8, fp16, ...) give empty entries; ``"none"`` gives ``{}``.
        Not counted in ``bytes_sent``."""
        if self.compressor is None:
            return {}
        return gather_state(self.compressor.local_state(), self.collectives)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Give this worker its part of a ``state_dict()`` back (every worker, before the next backward). A state
        from a different number of workers is not loaded (a warning; residuals restart from zero)."""
        if self.compressor is None or not state:
            return
        m = self.collectives.world_size
        mine = pick_state(state, self.collectives.rank, m, self.device)
        if mine is None:
            warnings.warn(f"datkit.compress: the compressor state is for {state.get('world_size')} workers, this run "
                          f"has {m}: error-feedback residuals start from zero", stacklevel=2)
            return
        self.compressor.load_local_state(mine)

    # --- shutting down -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the background thread (after it finished the queued buckets). Idempotent; call it after the last
        backward pass: DDP keeps calling the registered hook, which then raises."""
        self._closed = True
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> DDPCompressionHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """One line, e.g. ``int8 (two-sided, nearest, block 256) on 2 workers``."""
        what = "none (float32 allreduce)" if self.compressor is None else self.compressor.describe()
        return f"{what} on {self.collectives.world_size} workers"


__all__ = ["DDPCompressionHook"]
