"""Optimizers (sgd, adam, DAT's layer-wise adaptive LALR), the linear scaling rule and learning-rate / eps schedules."""
from .factory import OPTIMIZERS, build_optimizer, optim_config_errors, scaled_lr
from .lalr import LALR
from .schedules import SCHEDULES, build_scheduler, eps_at, lr_multiplier

__all__ = ["LALR", "OPTIMIZERS", "build_optimizer", "optim_config_errors", "scaled_lr", "SCHEDULES", "build_scheduler",
           "eps_at", "lr_multiplier"]
