"""Gradient compression for every backend (registry ``COMPRESSORS``, ``get_compressor(name, **options)``).

``none`` (float32), ``fp16``, ``bf16``, ``int8`` (per-block scale; nearest or stochastic rounding;
``two_sided``) and ``onebit`` (sign + scale, error feedback on worker and server), all on the sharded
parameter-server exchange of ``datkit.compress.base``; byte accounting in ``accounting``.
``register_ddp_hook(ddp_model, "int8", two_sided=True)`` (``ddp_hook``) runs them in a user's own DDP loop.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from datkit.registry import PluginError, Registry

from .accounting import ByteCounter, CountingCollectives, allreduce_bytes
from .base import Collectives, Compressor
from .buckets import GradientBuckets
from .cast import BF16, FP16, NoCompression
from .ddp_hook import DDPCompressionHook, register_ddp_hook
from .int8 import Int8
from .onebit import OneBit
from .state import gather_state, pick_state

COMPRESSORS: Registry[Callable[..., Compressor]] = Registry("compressor")
for _cls in (NoCompression, FP16, BF16, Int8, OneBit):
    COMPRESSORS.register(_cls.name)(_cls)


def compressor_options(name: str) -> tuple[str, ...]:
    """The options (besides ``seed``) that compressor ``name`` accepts."""
    return tuple(COMPRESSORS.get(name).options)


def get_compressor(name: str, **options: Any) -> Compressor:
    """Build compressor ``name`` (registered, or ``MODULE:CLASS`` of a ``Compressor`` subclass); unknown names list the
    known ones (``KeyError``); an import path that does not resolve and options that do not apply are refused
    (``ValueError``)."""
    try:
        cls = COMPRESSORS.get(name)  # an unknown name: KeyError listing the known ones
    except PluginError as err:
        raise ValueError(err.args[0]) from None
    if not (isinstance(cls, type) and issubclass(cls, Compressor)):
        raise ValueError(f"'{name}' is a {getattr(cls, '__name__', type(cls).__name__)}, "
                         f"not a datkit.compress.Compressor subclass")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    wrong = sorted(set(options) - accepted)
    if wrong:
        allowed = ", ".join(getattr(cls, "options", ())) or "none"
        raise ValueError(f"option(s) {', '.join(wrong)} do not apply to compressor '{name}' (its options: {allowed})")
    return cls(**options)


def compression_config_errors(cfg) -> list[str]:
    """Errors in ``cfg.compression``: the compressor resolves and every option set applies to it (built once)."""
    try:
        compressor_from_config(cfg.compression)
    except (KeyError, ValueError) as err:
        return [f"compression.name={cfg.compression.name!r}: {err.args[0]}"]
    return []


def compressor_from_config(ccfg, seed: int = 0) -> Compressor | None:
    """The compressor a ``compression`` config section asks for; None for ``none`` (the backend's allreduce).

    Only options changed from their defaults are passed on, so that setting one that does not apply to
    the chosen compressor (``two_sided`` with ``fp16``) fails with a message naming it.
    """
    if ccfg.name == "none":
        options = _changed_options(ccfg)
        if options:
            raise ValueError(f"option(s) {', '.join(sorted(options))} do not apply to compression.name=none")
        return None
    return get_compressor(ccfg.name, seed=seed, **_changed_options(ccfg))


def _changed_options(ccfg) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if ccfg.two_sided:
        out["two_sided"] = True
    if ccfg.rounding != "nearest":
        out["rounding"] = ccfg.rounding
    if ccfg.block_size != 0:
        out["block_size"] = int(ccfg.block_size)
    if not ccfg.error_feedback:
        out["error_feedback"] = False
    return out


__all__ = ["compression_config_errors", "compressor_from_config", "COMPRESSORS", "ByteCounter", "Collectives",
           "Compressor", "CountingCollectives", "DDPCompressionHook",
           "GradientBuckets", "allreduce_bytes", "compressor_options", "gather_state", "get_compressor", "pick_state",
           "register_ddp_hook"]
