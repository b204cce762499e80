"""datkit's gradient compressors as a DDP communication hook, for any ``DistributedDataParallel`` model.

``register_ddp_hook(ddp_model, "int8", two_sided=True)`` replaces DDP's float32 allreduce of every gradient
bucket by a compressor's sharded parameter-server exchange (``datkit.compress.base``): with M workers the
bucket's flat float32 gradient is cut into M chunks, worker i sends chunk j compressed to worker j
(``all_to_all``), worker j decodes the M versions and averages them in float32 in rank order, and sends
the average back to everyone (``all_gather``), re-compressed when the compressor is two-sided. The
compressors: ``fp16`` / ``bf16`` (16-bit casts), ``int8`` (one float32 scale per block; nearest or
stochastic rounding; ``two_sided`` is the DAT paper's "8-bit 2-sided", Zhang et al., UAI 2022, Table 4)
and ``onebit`` (sign + scale with error feedback on worker and server, as in 1-bit Adam, Tang et al. 2021,
and EF-SignSGD, Karimireddy et al. 2019). ``"none"`` keeps DDP's float32 mean-allreduce, timed and counted.

This module is the one implementation of datkit's DDP hooks: the torch backend (``backends/ddp_hooks.py``)
builds the same ``DDPCompressionHook`` with its own compressor, collectives, byte counter and timer, so a
user's own DDP loop runs the exchange bit for bit as ``datkit.train`` does, with the same byte accounting
(``ByteCounter`` / ``CountingCollectives``: the modelled bytes this worker sends, see ``accounting``).

How a bucket travels: the hook hands it to ONE background thread (first in, first out) that runs the
exchange with blocking collectives and completes the future DDP waits for at the end of backward, so the
exchange overlaps the backward pass of earlier layers as DDP's own allreduce does. Every worker issues
the buckets' collectives in DDP's bucket order, so they match across workers. Buckets are reduced with
their parameters in parameter-index order (``canonical``), so that error-feedback residuals stay attached
to the same gradients after DDP rebuilds its buckets (after the first iteration) and across a resume.

This package does not import ``datkit.backends``: the hook talks to ``torch.distributed`` through
``ProcessGroupCollectives`` (or any ``Collectives`` object it is given).
"""
from __future__ import annotations

import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .accounting import ByteCounter, CountingCollectives, allreduce_bytes
from .base import Collectives, Compressor
from .state import gather_state, pick_state
from .timing import CommIntervals, IntervalRecorder


class ProcessGroupCollectives:
    """The ``Collectives`` a compressor needs, on a ``torch.distributed`` process group (None: the default one).

    ``all_to_all(t)``: row block j of dim 0 goes to rank j (``all_to_all_single``); ``all_gather(t)`` ->
    ``(world_size, *t.shape)``; ``all_reduce(t, op)`` in place (op ``sum`` | ``mean`` | ``max`` | ``min``).
    Ranks are ranks within the group. On NCCL a CPU tensor (a rounding generator's state, when the state is
    gathered) travels through the current CUDA device and comes back on the CPU.
    """

    def __init__(self, process_group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("datkit.compress: torch.distributed is not initialized (call dist.init_process_group "
                               "before wrapping the model in DistributedDataParallel)")
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self._nccl = dist.get_backend(process_group) == "nccl"

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        if self._nccl and t.device.type == "cpu":
            return t.to(torch.device("cuda", torch.cuda.current_device()))
        return t

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        t = self._dev(tensor)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, "SUM" if op == "mean" else op.upper()), group=self.group)
        if op == "mean":
            t.div_(self.world_size)
        if t is not tensor:
            tensor.copy_(t)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        src = self._dev(tensor.contiguous().reshape(-1))  # gloo wants a flat output
        out = torch.empty(self.world_size * src.numel(), dtype=src.dtype, device=src.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # older torch: only the latter
        gather(out, src, group=self.group)
        return out.to(tensor.device).view(self.world_size, *tensor.shape)

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        src = self._dev(tensor.contiguous())
        out = torch.empty_like(src)
        dist.all_to_all_single(out, src, group=self.group)
        return out.to(tensor.device)


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
    def register(self, ddp_model: nn.parallel.DistributedDataParallel) -> "DDPCompressionHook":
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
            except BaseException as err:  # surfaces in the training thread when DDP waits
                fut.set_exception(err)

        self.pool.submit(work)
        return fut

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("datkit.compress: this DDP hook was closed; a DDP model cannot unregister its comm hook, "
                               "so close() only after the last backward pass")

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
            warnings.warn(f"datkit.compress: the compressor state is for {state.get('world_size')} workers, this run has "
                          f"{m}: error-feedback residuals start from zero", stacklevel=2)
            return
        self.compressor.load_local_state(mine)

    # --- shutting down -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the background thread (after it finished the queued buckets). Idempotent; call it after the last
        backward pass: DDP keeps calling the registered hook, which then raises."""
        self._closed = True
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> "DDPCompressionHook":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """One line, e.g. ``int8 (two-sided, nearest, block 256) on 2 workers``."""
        what = "none (float32 allreduce)" if self.compressor is None else self.compressor.describe()
        return f"{what} on {self.collectives.world_size} workers"


def register_ddp_hook(ddp_model: nn.parallel.DistributedDataParallel, compressor: str | Compressor = "int8", *,
                      process_group: Any = None, **options: Any) -> DDPCompressionHook:
    """Reduce ``ddp_model``'s gradients with one of datkit's compressors: the same exchange and byte accounting as
    inside ``datkit.train`` (see the module docstring for what is exchanged).

    Args:
        ddp_model: a ``torch.nn.parallel.DistributedDataParallel`` model, before its first backward pass (a DDP
            model takes one comm hook). Its trainable parameters must be float32 when a compressor is used (the
            exchange averages float32 gradients; ``torch.autocast`` keeps parameters float32).
        compressor: a registered name -- ``"none"`` (DDP's float32 mean-allreduce, timed and counted), ``"fp16"``,
            ``"bf16"``, ``"int8"`` (default), ``"onebit"`` --, an import path ``MODULE:CLASS`` of a ``Compressor``
            subclass, or a ``Compressor`` object (used as it is).
        process_group: the group to reduce over (default: the DDP model's own group).
        **options: the compressor's options, passed to ``datkit.compress.get_compressor(name, **options)``:
            ``int8``: ``two_sided`` (False), ``rounding`` (``"nearest"`` | ``"stochastic"``), ``block_size`` (256);
            ``onebit``: ``error_feedback`` (True), ``block_size`` (1024, a multiple of 8); every compressor:
            ``seed`` (stochastic rounding is seeded from (seed, rank)).

    Input: the gradients DDP puts in a bucket, finite float32 values of any magnitude (int8 and onebit scale per
    block; fp16 overflows beyond 65504). A NaN/Inf is not detected here and comes back from int8/onebit codes
    as finite garbage.

    Returns:
        the registered ``DDPCompressionHook``: ``bytes_sent()`` (this worker's bytes, as datkit's
        ``bytes_per_iter`` counts them), ``comm_seconds()``, ``state_dict()`` / ``load_state_dict()``
        (error-feedback residuals, collective), ``close()`` (stops the background thread).

    Raises:
        TypeError: ``ddp_model`` is not a ``DistributedDataParallel``, or ``compressor`` is neither a name nor a
            ``Compressor``.
        ValueError: an unknown compressor name (the message lists the known ones), options that do not apply to
            it, or a parameter that is not float32 with a compressor.
        RuntimeError: torch.distributed is not initialized.

    Example::

        ddp = DistributedDataParallel(model)
        hook = register_ddp_hook(ddp, "int8", two_sided=True)   # the DAT paper's "8-bit 2-sided"
        ...  # train as usual
        print(hook.bytes_sent() / steps)                         # bytes per iteration sent by this worker
        hook.close()
    """
    from . import COMPRESSORS, get_compressor  # the registry lives in the package's __init__

    if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
        raise TypeError(f"register_ddp_hook needs a torch.nn.parallel.DistributedDataParallel model, got "
                        f"{type(ddp_model).__module__}.{type(ddp_model).__qualname__} (wrap it first: "
                        f"DistributedDataParallel(model))")
    if isinstance(compressor, str):
        if compressor == "none":
            if options:
                raise ValueError(f"option(s) {', '.join(sorted(options))} do not apply to compressor 'none' "
                                 f"(the float32 allreduce)")
            comp: Compressor | None = None
        else:
            try:
                comp = get_compressor(compressor, **options)
            except KeyError as err:  # an unknown name: the message lists the known ones
                raise ValueError(err.args[0] if err.args else f"unknown compressor {compressor!r}; known: "
                                 f"{', '.join(COMPRESSORS.names())}") from None
    elif isinstance(compressor, Compressor):
        if options:
            raise ValueError(f"options ({', '.join(sorted(options))}) are for a compressor given by name; "
                             f"{type(compressor).__name__} is already built")
        comp = compressor
    else:
        raise TypeError(f"compressor must be a name (str) or a datkit.compress.Compressor, got {type(compressor).__name__}")

    module = ddp_model.module
    if comp is not None:
        for name, p in module.named_parameters():
            if p.requires_grad and p.dtype != torch.float32:
                raise ValueError(f"compressor '{comp.name}' averages float32 gradients; parameter '{name}' is {p.dtype} "
                                 f"(keep the parameters float32, e.g. with torch.autocast, or use 'none')")
    group = process_group if process_group is not None else getattr(ddp_model, "process_group", None)
    coll = ProcessGroupCollectives(group)
    hook = DDPCompressionHook(comp, coll, list(module.parameters()), process_group=group)
    return hook.register(ddp_model)


__all__ = ["CommIntervals", "DDPCompressionHook", "IntervalRecorder", "ProcessGroupCollectives", "register_ddp_hook"]
