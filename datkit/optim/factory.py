"""Optimizers (registry ``OPTIMIZERS``: sgd, adam, lalr, onebit_adam, onebit_lamb) and the linear scaling rule.

Linear scaling (Goyal et al., "Accurate, Large Minibatch SGD", 2017): with ``optim.scale_lr`` the
learning rate is ``lr * global_batch / base_batch_size``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..config import ConfigError, at_least, choices, raise_errors
from ..registry import PluginError, Registry, is_import_path
from .lalr import BASES, EXCLUDE_CHOICES, LALR
from .onebit import OnebitAdam
from .schedules import schedule_errors

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")


def scaled_lr(optim_cfg, global_batch: int) -> float:
    """The peak learning rate after the (optional) linear scaling rule."""
    return optim_cfg.lr * global_batch / optim_cfg.base_batch_size if optim_cfg.scale_lr else optim_cfg.lr


@OPTIMIZERS.register("sgd")
def _sgd(params: Iterable, lr: float, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adam")
def _adam(params: Iterable, lr: float, cfg) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("lalr")
def _lalr(params: Iterable, lr: float, cfg) -> torch.optim.Optimizer:
    """DAT's layer-wise adaptive learning rate over ``optim.lalr_base`` (see ``datkit.optim.lalr``)."""
    return LALR(params, lr=lr, base=cfg.lalr_base, betas=tuple(cfg.betas), momentum=cfg.momentum,
                nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay, c_l=cfg.c_l, c_u=cfg.c_u,
                exclude=cfg.lalr_exclude)


_lalr.needs_whole_layers = True  # type: ignore[attr-defined]  # its trust ratio is per layer: not on ZeRO >= 1 partitions


def _onebit(lamb: bool) -> Callable[..., torch.optim.Optimizer]:
    def build(params: Iterable, lr: float, cfg) -> torch.optim.Optimizer:
        return OnebitAdam(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                          freeze_step=cfg.freeze_step, block_size=cfg.onebit_block_size,
                          error_feedback=cfg.onebit_error_feedback, lamb=lamb, c_l=cfg.c_l, c_u=cfg.c_u,
                          exclude=cfg.lalr_exclude, variance_floor=cfg.onebit_variance_floor)

    build.__doc__ = (f"1-bit {'LAMB (LALR trust ratio)' if lamb else 'Adam'}: frozen variance after optim.freeze_step, "
                     "compressed momentum (``datkit.optim.onebit``)")
    build.communicates = True  # type: ignore[attr-defined]  # reduces over workers itself (datkit.optim.communicating)
    return build


OPTIMIZERS.register("onebit_adam")(_onebit(lamb=False))
OPTIMIZERS.register("onebit_lamb")(_onebit(lamb=True))


def optim_config_errors(cfg) -> list[str]:
    """Errors in ``cfg.optim`` and ``cfg.schedule``; a communicating optimizer with gradient compression."""
    e = optimizer_errors(cfg.optim) + schedule_errors(cfg.schedule)
    try:
        talks = getattr(OPTIMIZERS.get(cfg.optim.name), "communicates", False)
    except (KeyError, PluginError):
        talks = False
    if talks and cfg.compression.name != "none":
        e.append(f"compression.name={cfg.compression.name!r} with optim.name={cfg.optim.name}: "
                 "this optimizer compresses its own momentum after optim.freeze_step "
                 "(optim.onebit_block_size, optim.onebit_error_feedback); "
                 "use compression.name=none")
    if talks and cfg.train.grad_clip > 0:
        e.append(f"train.grad_clip={cfg.train.grad_clip} with optim.name={cfg.optim.name}: this optimizer averages the "
                 "gradients itself, inside its step, so clipping before it would clip each worker's own gradient; "
                 "use train.grad_clip=0")
    return e


def optimizer_errors(o) -> list[str]:
    """Errors in an ``optim`` section: a registered optimizer or an importable ``MODULE:CALLABLE(params, lr,
    optim_cfg)``, its hyper-parameters, LALR's options."""
    e: list[str] = []
    try:
        OPTIMIZERS.get(o.name)
    except (KeyError, PluginError) as err:
        e.append(f"optim.name={o.name!r}: {err.args[0]}")
    at_least(e, "optim.lr", o.lr, 0.0, strict=True)
    at_least(e, "optim.weight_decay", o.weight_decay, 0.0)
    if not 0.0 <= o.momentum < 1.0:
        e.append(f"optim.momentum={o.momentum!r} must be in [0, 1)")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        e.append(f"optim.betas={list(o.betas)!r} must be two numbers in [0, 1)")
    at_least(e, "optim.base_batch_size", o.base_batch_size, 1)
    choices(e, "optim.lalr_base", o.lalr_base, BASES)
    choices(e, "optim.lalr_exclude", o.lalr_exclude, EXCLUDE_CHOICES)
    at_least(e, "optim.c_l", o.c_l, 0.0)
    f = o.freeze_step
    if not f > 0 or (f >= 1 and f != int(f)):
        e.append(f"optim.freeze_step={f!r} must be a whole number of steps >= 1 or a fraction of the run in (0, 1)")
    at_least(e, "optim.onebit_variance_floor", o.onebit_variance_floor, 0.0)
    if o.onebit_block_size < 8 or o.onebit_block_size % 8:
        e.append(f"optim.onebit_block_size={o.onebit_block_size!r} must be a positive multiple of 8")
    if o.c_u < o.c_l:
        e.append(f"optim.c_u={o.c_u!r} must be >= optim.c_l={o.c_l!r} (tau = min(max(||theta||, c_l), c_u))")
    return e


def build_optimizer(optim_cfg, params: Iterable, global_batch: int) -> torch.optim.Optimizer:
    """The optimizer named by ``optim_cfg.name`` at the (scaled) peak learning rate; a plug-in's failure or a result
    that is not a ``torch.optim.Optimizer`` raises ``ConfigError`` naming ``optim.name``."""
    raise_errors(optimizer_errors(optim_cfg))  # the plug-in checks its own section when it is built
    name = optim_cfg.name
    factory = OPTIMIZERS.get(name)
    try:
        opt = factory(params, scaled_lr(optim_cfg, global_batch), optim_cfg)
    except Exception as err:  # a plug-in's own error, in one line
        if not is_import_path(name):
            raise
        raise ConfigError(f"optim.name={name!r}: calling it (params, lr, optim_cfg) failed: "
                          f"{type(err).__name__}: {err}") from None
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(f"optim.name={name!r} returned a {type(opt).__name__}, not a torch.optim.Optimizer")
    return opt
