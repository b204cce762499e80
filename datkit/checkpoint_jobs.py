"""What the jobs that start from a saved checkpoint share: ``datkit.evaluate`` and ``datkit.certify``.

Their command line is ``key=value`` arguments only: the job's own bare options (``checkpoint=PATH`` among them)
and training-config overrides (dotted keys, or one of :data:`ROOT_SCALARS`); ``--help`` prints the job's usage
and exits 0, ``--config`` is refused (the configuration comes from the checkpoint). The run is rebuilt from
the checkpoint (``load_run``: schema <- the checkpoint's config <- the overrides) and so is its model
(``load_model``). Every problem is a ``ConfigError`` with one line that names it; the jobs print it once and exit
with code 2 (``datkit.cli.fail``).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from datkit.cli import parse_args
from datkit.config import Config, ConfigError

# Root config keys without a dot that a job's command line may override.
ROOT_SCALARS = ("backend", "device")


def job_argv(argv: Sequence[str] | None, usage: str) -> list[str]:
    """The job's arguments (``sys.argv[1:]`` when ``argv`` is None); with ``-h`` / ``--help`` among them, print
    ``usage`` and exit 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        raise SystemExit(0)
    return argv


def job_items(argv: Sequence[str], prog: str, example: str = "") -> list[str]:
    """The ``key=value`` items of ``argv`` (``datkit.cli.parse_args``: ``--local_rank`` handled); ``ConfigError`` for
    ``--config``, which names ``prog`` and, after the advice to use overrides, ``example``."""
    config_path, items = parse_args(argv)
    if config_path is not None:
        raise ConfigError(f"--config is not used by {prog}: the configuration comes from the checkpoint; "
                          f"change it with key=value overrides{example}")
    return items


def key_value(item: str) -> tuple[str, str]:
    """``(key, value)`` of a ``key=value`` argument; ``ConfigError`` for anything else."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"argument '{item}' is not of the form key=value (see --help)")
    return key, value


def is_config_override(key: str) -> bool:
    """Whether ``key`` is a training-config override (a dotted key or one of :data:`ROOT_SCALARS`)."""
    return "." in key or key in ROOT_SCALARS


def require_checkpoint(path: str | None) -> None:
    """``ConfigError`` unless ``checkpoint=PATH`` was given."""
    if not path:
        raise ConfigError("checkpoint=PATH is required (a datkit checkpoint, e.g. runs/<name>/checkpoint_last.pt)")


def load_run(path: str, overrides: Sequence[str]) -> tuple[dict[str, Any], Any]:
    """(checkpoint state, config) where config = schema <- the checkpoint's config <- ``overrides``."""
    from datkit.checkpoint import CheckpointError, load_datkit_checkpoint
    from datkit.config.load import _translate

    state = load_datkit_checkpoint(path, "checkpoint")  # one-line CheckpointError for any unusable file
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(state["config"]))
    except OmegaConfBaseException as err:
        raise CheckpointError("checkpoint", path, f"the config stored in it does not fit this datkit's schema: "
                                                  f"{str(err).splitlines()[0]}") from None
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise _translate(err, "the command line") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse a command-line value as YAML ({str(err).splitlines()[0]})") from None
    return state, cfg


def load_model(state: dict[str, Any], cfg: Any, spec: Any, path: str, what: str, hint: str = "") -> torch.nn.Module:
    """The checkpoint's model (``cfg.model`` for dataset ``spec``, its weights loaded); a ``ConfigError`` when it
    cannot be built or the weights do not fit ``what`` (a description of the model that names the overrides to
    change), ``hint`` put before the loader's own words."""
    from datkit.checkpoint import check_model_fits
    from datkit.engine import build_model

    try:
        model = build_model(cfg, spec)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cannot build model '{cfg.model.name}' for checkpoint '{path}': {err}") from None
    check_model_fits(state["model"], model, "checkpoint", path, what)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ConfigError(f"the weights in checkpoint '{path}' do not fit {what}: {hint}"
                          f"{' '.join(str(err).split())[:600]}") from None
    return model
