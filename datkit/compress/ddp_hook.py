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

The hook is ``DDPCompressionHook`` (``datkit.compress.comm_hook``), the one implementation of datkit's DDP hooks:
the torch backend (``backends/ddp_hooks.py``) builds the same hook with its own compressor, collectives, byte
counter and timer, so a user's own DDP loop runs the exchange bit for bit as ``datkit.train`` does, with the same
byte accounting (``ByteCounter`` / ``CountingCollectives``: the modelled bytes this worker sends, see
``accounting``).

This package does not import ``datkit.backends``: the hook talks to ``torch.distributed`` through
``ProcessGroupCollectives`` (``datkit.compress.process_group``; or any ``Collectives`` object it is given).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Compressor
from .comm_hook import DDPCompressionHook
from .process_group import ProcessGroupCollectives
from .timing import CommIntervals, IntervalRecorder


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
        raise TypeError("compressor must be a name (str) or a datkit.compress.Compressor, got "
                        f"{type(compressor).__name__}")

    module = ddp_model.module
    if comp is not None:
        for name, p in module.named_parameters():
            if p.requires_grad and p.dtype != torch.float32:
                raise ValueError(f"compressor '{comp.name}' averages float32 gradients; parameter '{name}' is "
                                 f"{p.dtype} (keep the parameters float32, e.g. with torch.autocast, or use 'none')")
    group = process_group if process_group is not None else getattr(ddp_model, "process_group", None)
    coll = ProcessGroupCollectives(group)
    hook = DDPCompressionHook(comp, coll, list(module.parameters()), process_group=group)
    return hook.register(ddp_model)


__all__ = ["CommIntervals", "DDPCompressionHook", "IntervalRecorder", "ProcessGroupCollectives", "register_ddp_hook"]
