"""Column C and ``bytes_per_iter`` for DeepSpeed's own gradient communication.

DeepSpeed reduces gradients (ZeRO 0: allreduce; ZeRO 1/2: reduce-scatter, then an all-gather of the
updated partitions; ZeRO 3: all-gathers of parameters in forward and backward too) through
``deepspeed.comm``. ``CommMeter`` wraps those functions; while ``active`` (the backend switches it on
around ``backward`` and ``step``) every call's wall time goes into the backend's ``CommTimer`` and its
payload, by the ring model of ``datkit.compress.accounting``, into its ``ByteCounter``. Nested calls
(``allgather_fn`` calling ``all_gather_into_tensor``) count once. The config turns DeepSpeed's
``overlap_comm`` off on CPU, so these calls block and the measured time is the communication time.

At ZeRO-3 every forward pass and every backward pass gathers parameters, also those of an attack or a bound on
``engine.module`` (forward, then ``torch.autograd.grad`` w.r.t. the input), outside ``backward`` and ``step``:
the backend sets ``always`` and the meter counts every call; the trainer's resets of the counter at the start and
end of an epoch's training keep evaluation and checkpoints out of ``bytes_per_iter``. (Metered only in
``backward``/``step``, ZeRO-3 reported 0.43 of the bytes its worker wrote to its sockets with 2-step PGD:
``tests/test_deepspeed.py``'s wire check.)
"""
from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


def _nbytes(x: Any) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.numel() * x.element_size())
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0.0


# name -> (index of the payload argument, factor(M) applied to its bytes)
_MODELS: dict[str, tuple[int, Callable[[int], float]]] = {
    "all_reduce": (0, lambda m: 2.0 * (m - 1) / m),
    "all_reduce_coalesced": (0, lambda m: 2.0 * (m - 1) / m),
    "inference_all_reduce": (0, lambda m: 2.0 * (m - 1) / m),
    "all_gather": (1, lambda m: float(m - 1)),
    "all_gather_into_tensor": (1, lambda m: float(m - 1)),
    "allgather_fn": (1, lambda m: float(m - 1)),
    "all_gather_coalesced": (1, lambda m: float(m - 1)),
    "reduce_scatter_tensor": (1, lambda m: (m - 1) / m),
    "reduce_scatter_fn": (1, lambda m: (m - 1) / m),
    "reduce_scatter": (1, lambda m: (m - 1) / m),
    "reduce": (0, lambda m: (m - 1) / m),
    "all_to_all_single": (1, lambda m: (m - 1) / m),
    "broadcast": (0, lambda m: (m - 1) / m),
}
# gloo has no reduce-scatter of its own: torch's ProcessGroupGloo runs a whole allreduce and keeps this rank's
# chunk, so a reduce-scatter writes 2 (M-1)/M of its input per worker there (measured: 1.0 of the input with 2
# workers, 1.33 with 3), not the ring's (M-1)/M. ZeRO-3 reduce-scatters its gradients (reduce_scatter_fn).
_GLOO_MODELS: dict[str, Callable[[int], float]] = {
    "reduce_scatter_tensor": lambda m: 2.0 * (m - 1) / m,
    "reduce_scatter_fn": lambda m: 2.0 * (m - 1) / m,
    "reduce_scatter": lambda m: 2.0 * (m - 1) / m,
}


class CommMeter:
    """Times and counts ``deepspeed.comm`` collectives while ``active`` (see module docstring)."""

    def __init__(self, timer, counter, world_size: int) -> None:
        self.timer, self.counter, self.world_size = timer, counter, world_size
        self.active = False
        self.always = False  # ZeRO-3: meter every call (parameters are gathered in every forward and backward)
        self._local = threading.local()
        self._originals: dict[str, Callable] = {}

    def install(self) -> None:
        import deepspeed.comm as ds_comm

        dist = torch.distributed
        gloo = dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"
        for name, (pos, factor) in _MODELS.items():
            factor = _GLOO_MODELS.get(name, factor) if gloo else factor
            fn = getattr(ds_comm, name, None)
            if fn is None or name in self._originals:
                continue
            self._originals[name] = fn
            setattr(ds_comm, name, self._wrap(fn, name, pos, factor))

    def uninstall(self) -> None:
        import deepspeed.comm as ds_comm

        for name, fn in self._originals.items():
            setattr(ds_comm, name, fn)
        self._originals.clear()

    def _wrap(self, fn: Callable, name: str, pos: int, factor: Callable[[int], float]) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if not (self.active or self.always) or depth:
                return fn(*args, **kwargs)
            self._local.depth = depth + 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth
                self.timer.record(start)
                payload = args[pos] if len(args) > pos else next(iter(kwargs.values()), None)
                self.counter.add(_nbytes(payload) * factor(self.world_size))

        return wrapper


def unlink_shm_buffer(ds_comm: Any, rank: int) -> None:
    """Remove this rank's name of DeepSpeed's CPU shared-memory allreduce buffer from ``/dev/shm``.

    On CPU, ``deepspeed.init_distributed`` builds its shm op, and when all ranks are on one machine every rank
    creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (69 MB) and maps the
    others'. DeepSpeed 0.19 never unlinks them, so every run on a new port (each test, each launch with a free
    port) left 69 MB per worker behind (7 GB after a day of runs here). After a barrier every rank has mapped every
    buffer, so the names can go: the memory itself lives until the last process unmaps it, also when killed.
    """
    path = "/dev/shm/deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), rank)
    ds_comm.barrier()  # every rank, every time (whether a name exists may differ between ranks)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
