"""Load the configuration: schema defaults <- YAML file (``--config``) <- ``key=value`` overrides.

omegaconf's own errors are translated into ``ConfigError`` messages that name the full key and list
the allowed keys (for an unknown key) or the expected type (for a wrong type).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import omegaconf
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import ConfigError
from .schema import Config


def _section_keys(full_key: str) -> list[str]:
    """Allowed keys of the section that contains ``full_key`` (``train.foo`` -> fields of TrainConfig)."""
    node: object = Config
    for part in full_key.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)}  # type: ignore[arg-type]
        if part not in fields:
            break
        node = fields[part].default_factory()  # type: ignore[misc]
        node = type(node)
    return [f.name for f in dataclasses.fields(node)]  # type: ignore[arg-type]


def _translate(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        section = key.rsplit(".", 1)[0] if "." in key else "<root>"
        allowed = ", ".join(_section_keys(key))
        return ConfigError(f"unknown config key '{key}' (from {source}); allowed keys in {section}: {allowed}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"bad value for config key '{key}' (from {source}): {msg}")
    return ConfigError(f"config error at '{key}' (from {source}): {str(err).splitlines()[0]}")


def _parse_overrides(overrides: Sequence[str]) -> list[str]:
    out = []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"command-line override '{item}' is not of the form key=value (e.g. train.epochs=3)")
        out.append(item)
    return out


def path_safe(name: str) -> str:
    """``name`` usable as a folder name everywhere: an import path's ``:`` becomes ``-``
    (``examples.nets:make`` -> ``examples.nets-make``); registered names are unchanged."""
    return str(name).replace(":", "-").replace("/", "-")


# omegaconf 2.4 renamed register_new_resolver to register_resolver (2.3's register_resolver is the legacy one)
if tuple(int(p) for p in omegaconf.__version__.split(".")[:2]) >= (2, 4):
    OmegaConf.register_resolver("path_safe", path_safe, replace=True)
else:  # pragma: no cover -- omegaconf 2.3
    OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)


def load_config(config_path: str | Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Return the merged, type-checked config (not yet value-validated: see ``datkit.preflight.validate_config``).

    ``config_path``: a YAML file, or a mapping of the same nested form (``{"train": {"epochs": 3}}``), or None."""
    cfg = OmegaConf.structured(Config)
    if isinstance(config_path, Mapping):
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(config_path)))
        except OmegaConfBaseException as err:
            raise _translate(err, "the config mapping") from None
    elif config_path:
        if not os.path.isfile(config_path):
            raise ConfigError(f"config file '{config_path}' does not exist")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(config_path))
        except OmegaConfBaseException as err:
            raise _translate(err, config_path) from None
        except yaml.YAMLError as err:  # e.g. an unclosed bracket: name the file and where the parser stopped
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file '{config_path}' is not valid YAML{where}: {what}") from None
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(_parse_overrides(overrides)))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise _translate(err, "the command line") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse a command-line value as YAML ({str(err).splitlines()[0]}); "
                          "write mappings as key={a: 1, b: 2} with a space after each colon") from None
    OmegaConf.set_readonly(cfg, False)
    return cfg  # type: ignore[return-value]


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (written next to the results)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
