"""Every config check at once, before any worker trains: the core's sections (``datkit.config``) and each plug-in's
own (data, model, method, optimizer and schedule, compressor, backend, smoothing, bounds, semi-supervised recipe).

Each plug-in owns the check of its section and runs it again when it is built; this module only asks them all,
so that one start-up error lists every problem (``ConfigError``: one line per key, naming the allowed values).
"""
from __future__ import annotations

from datkit.backends import backend_config_errors
from datkit.certify.config_checks import bounds_config_errors, smoothing_config_errors
from datkit.compress import compression_config_errors
from datkit.config import core_errors, raise_errors, validate_for_training, validate_for_world
from datkit.data import data_config_errors
from datkit.methods import method_config_errors
from datkit.models import model_config_errors
from datkit.optim import optim_config_errors
from datkit.semisup.checks import semisup_config_errors

CHECKS = (core_errors, backend_config_errors, data_config_errors, model_config_errors, method_config_errors,
          optim_config_errors, compression_config_errors, smoothing_config_errors, bounds_config_errors,
          semisup_config_errors)


def config_errors(cfg, *, data: bool = True) -> list[str]:
    """Every error in ``cfg`` (``data=False`` skips ``data.*``: datasets handed over as objects, ``datkit.fit``)."""
    return [err for check in CHECKS if data or check is not data_config_errors for err in check(cfg)]


def validate_config(cfg, *, data: bool = True) -> None:
    """Raise one ``ConfigError`` listing every impossible value in ``cfg``."""
    raise_errors(config_errors(cfg, data=data))


__all__ = ["config_errors", "validate_config", "validate_for_training", "validate_for_world"]
