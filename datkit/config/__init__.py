"""Configuration: one typed omegaconf schema, YAML files, ``key=value`` overrides, the core's value checks.

A leaf package: it imports no other part of datkit. Plug-ins check their own sections; ``datkit.preflight``
runs every check at once (``validate_config``).
"""
from .errors import ConfigError
from .load import load_config, to_yaml
from .schema import Config
from .validate import (
           CHECKPOINT,
           at_least,
           choices,
           core_errors,
           raise_errors,
           resume_path,
           validate_for_training,
           validate_for_world,
)

__all__ = ["CHECKPOINT", "Config", "ConfigError", "at_least", "choices", "core_errors", "load_config", "raise_errors",
           "resume_path", "to_yaml", "validate_for_training", "validate_for_world"]
