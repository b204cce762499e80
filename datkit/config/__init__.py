"""Configuration: one typed omegaconf schema, YAML files, ``key=value`` overrides, start-up validation."""
from .errors import ConfigError
from .load import load_config, to_yaml
from .schema import Config
from .validate import validate_config, validate_for_training, validate_for_world

__all__ = ["Config", "ConfigError", "load_config", "to_yaml", "validate_config", "validate_for_training", "validate_for_world"]
