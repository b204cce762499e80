"""Gradient averaging through ``hvd.DistributedOptimizer``, metered for column C and ``bytes_per_iter``.

Why Horovod's DistributedOptimizer (and not an explicit grouped allreduce in ``step``) for
``compression.name`` none / fp16: its hooks start each parameter's allreduce as soon as backward has
accumulated that gradient, so communication overlaps the rest of the backward pass (what Horovod users
run it for), and ``Compression.fp16`` is Horovod's own hook. The trainer's contract fits it:

- the trainer calls ``backward`` once per micro-batch, ``train.grad_accum`` times per optimizer step, so
  ``backward_passes_per_step = train.grad_accum``: the first passes accumulate locally, the last one
  starts the allreduce (the trainer's ``no_sync`` is then not needed, and Horovod enforces the count);
- attacks and bounds take ``torch.autograd.grad`` w.r.t. the input on the unwrapped model, which never
  runs the parameters' gradient accumulators, so the hooks do not fire for them (an attack that called
  ``loss.backward()`` would make Horovod raise "Gradients were computed more than
  backward_passes_per_step times");
- gradient clipping needs the averaged gradients: ``synchronize`` first, then clip, then the step under
  ``skip_synchronize`` (Horovod's documented recipe).

Grouping: the parameters go into groups of at most ``dist.bucket_cap_mb`` megabytes, last layers first
(Horovod's ``groups``; DDP's buckets): a group's grouped allreduce starts when its last gradient is ready.
Without groups Horovod negotiates whatever gradients became ready in each 1 ms cycle, so a backward pass
of a small model costs several negotiation rounds; grouping makes it one round per group.

Metering: each allreduce Horovod starts adds its payload (float32, or float16 with ``fp16``) to the
backend's ``ByteCounter`` (held by its ``grad_sync.GradientSync``) by the ring model (``2 (M-1)/M`` of the bytes);
C gets one interval per step, from the first allreduce's start to the end of ``synchronize`` (the allreduces run
asynchronously in Horovod's background thread; their completion is observed there), as the torch backend's DDP hook
records [bucket start, bucket completion].
"""
from __future__ import annotations

import time
from typing import Any

import torch

from datkit.compress import allreduce_bytes

from .grad_sync import GradientSync


class MeteredDistributedOptimizer:
    """Wraps ``optimizer`` in ``hvd.DistributedOptimizer`` and meters its communication (see module doc)."""

    def __init__(self, hvd: Any, grads: GradientSync, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                 fp16: bool, backward_passes_per_step: int, group_cap_mb: float = 25.0) -> None:
        self.grads, self.fp16 = grads, fp16
        compression = hvd.Compression.fp16 if fp16 else hvd.Compression.none
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=list(model.named_parameters()),
                                                  compression=compression,
                                                  backward_passes_per_step=backward_passes_per_step,
                                                  groups=size_groups(params, group_cap_mb))
        for name in ("_allreduce_grad_async", "_grouped_allreduce_grad_async"):
            if not hasattr(self.optimizer, name):
                raise RuntimeError(f"this Horovod's DistributedOptimizer has no {name} (datkit meters Horovod 0.28.x); "
                                   "install Horovod with launchers/install_horovod.sh")
        # the hooks and synchronize() look these up on the instance
        opt = self.optimizer
        self._submit, self._submit_group = opt._allreduce_grad_async, opt._grouped_allreduce_grad_async
        self.optimizer._allreduce_grad_async = lambda p: self._metered(self._submit, p, [p])
        self.optimizer._grouped_allreduce_grad_async = lambda ps: self._metered(self._submit_group, ps, ps)
        self._first_start: float | None = None
        self._synchronized = False

    def _metered(self, submit, arg, params: list[torch.nn.Parameter]):
        if self._first_start is None:
            self._first_start = time.perf_counter()
        nbytes = 0
        for p in params:
            self.grads.note_gradients(p.grad)  # this worker's NaN/Inf, before the average hides whose it was
        handle = submit(arg)
        for p in params:
            itemsize = 2 if self.fp16 and p.grad.is_floating_point() else p.grad.element_size()
            nbytes += p.grad.numel() * itemsize
        self.grads.byte_counter.add(allreduce_bytes(nbytes, self.grads.world_size))
        return handle

    def synchronize(self) -> None:
        """Wait for every gradient's allreduce (starting those the hooks did not); idempotent until ``step``."""
        if self._synchronized:
            return
        start = time.perf_counter()
        self.optimizer.synchronize()
        self.grads.comm_timer.record(self._first_start if self._first_start is not None else start)
        self._first_start, self._synchronized = None, True

    def drop(self) -> None:
        """Averaged gradients -> dropped without a step (a skipped non-finite step)."""
        self.synchronize()
        self._synchronized = False
        opt = self.optimizer
        super(type(opt), opt).zero_grad(set_to_none=True)

    def step(self) -> None:
        """Averaged gradients -> optimizer step -> gradients set to None."""
        self.synchronize()
        opt = self.optimizer
        with opt.skip_synchronize():
            opt.step()
        self._synchronized = False
        # Horovod's zero_grad() takes no set_to_none; its handles are cleared by synchronize, so the
        # wrapped optimizer class's own zero_grad is safe here.
        super(type(opt), opt).zero_grad(set_to_none=True)


def size_groups(params: list[torch.nn.Parameter], cap_mb: float) -> list[list[torch.nn.Parameter]]:
    """``params`` in groups of at most ``cap_mb`` megabytes (float32), last parameters first (backward order)."""
    cap = max(1, int(cap_mb * 1024 * 1024))
    groups: list[list[torch.nn.Parameter]] = []
    current: list[torch.nn.Parameter] = []
    size = 0
    for p in reversed(params):
        nbytes = p.numel() * 4
        if current and size + nbytes > cap:
            groups.append(current)
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        groups.append(current)
    return groups
