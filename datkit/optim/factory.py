"""Optimizers (registry ``OPTIMIZERS``: sgd, adam, lalr) and the linear scaling rule.

Linear scaling (Goyal et al., "Accurate, Large Minibatch SGD", 2017): with ``optim.scale_lr`` the
learning rate is ``lr * global_batch / base_batch_size``.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..registry import Registry
from .lalr import LALR

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


def build_optimizer(optim_cfg, params: Iterable, global_batch: int) -> torch.optim.Optimizer:
    """The optimizer named by ``optim_cfg.name`` at the (scaled) peak learning rate."""
    return OPTIMIZERS.get(optim_cfg.name)(params, scaled_lr(optim_cfg, global_batch), optim_cfg)
