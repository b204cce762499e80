"""The Method seam: what one training step minimizes.

The trainer asks a method for a loss on a (micro-)batch and asks the backend to reduce gradients;
neither knows the other's internals. Attacks run on the *unwrapped* model (``raw``); the loss's
forward passes go through the (possibly wrapped) ``model`` so that the backend sees them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, at_least, raise_errors
from ..registry import PluginError, Registry


@dataclass
class StepInfo:
    """Per-step context a method may need: the current attack budget (after the eps ramp)."""

    eps: float


class Method(ABC):
    """A training objective. ``cfg`` is the full run config (``cfg.method``, ``cfg.attack``)."""

    uses_attack: bool = True
    # True when the method reads the modules' weights directly (bound propagation), not only through forward():
    # a backend that partitions parameters outside forward (DeepSpeed ZeRO-3) refuses such a method at start-up
    reads_parameters: bool = False

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    @classmethod
    def config_errors(cls, cfg) -> list[str]:
        """Errors in the config sections this method owns (e.g. ``bounds.*``); checked before any worker trains."""
        return []

    @abstractmethod
    def loss(self, model: nn.Module, raw: nn.Module, x: torch.Tensor, y: torch.Tensor, info: StepInfo) -> torch.Tensor:
        """Scalar loss (mean over the batch) whose gradient the trainer back-propagates."""

    # --- optional hooks (defaults: nothing to do) -------------------------------------------------
    def train_eps(self, progress: float) -> float:
        """The training budget after ``progress`` epochs (fractional): ``attack.eps`` ramped linearly over
        ``attack.eps_warmup_epochs``. Certified methods override it with their own schedule."""
        from ..optim import eps_at

        return eps_at(self.cfg.attack.eps, self.cfg.attack.eps_warmup_epochs, progress)

    def training_attack(self, eps: float) -> Any:
        """The attack this method trains against at budget ``eps`` (a ``datkit.attacks.Attack``), or None (default:
        the method has none). The catastrophic-overfitting check compares PGD with it
        (``datkit.engine.overfitting``)."""
        return None

    def prepare_model(self, model: nn.Module) -> None:  # noqa: B027  (a no-op default hook: overriding is optional)
        """Called once on the freshly built model, before it is wrapped for training (e.g. a special initialization)."""

    def eval_metrics(self) -> dict[str, Any]:
        """Extra evaluation columns: name -> an object with ``correct(model, x, y) -> int`` (see
        ``datkit.engine.evaluate.Metric``), evaluated next to TA and RA."""
        return {}


METHODS: Registry[Callable[..., Method]] = Registry("method")


def method_config_errors(cfg) -> list[str]:
    """Errors in ``cfg.method`` and in the sections the chosen method owns: ``method.name`` is registered or an
    importable ``MODULE:CALLABLE`` (a ``Method`` subclass, or a function ``f(cfg) -> Method``)."""
    try:
        factory = METHODS.get(cfg.method.name)
    except (KeyError, PluginError) as err:
        return [f"method.name={cfg.method.name!r}: {err.args[0]}"]
    errors: list[str] = []
    at_least(errors, "method.lam", cfg.method.lam, 0.0)
    at_least(errors, "method.beta", cfg.method.beta, 0.0)
    own = getattr(factory, "config_errors", None)
    if callable(own):
        errors += own(cfg)
    return errors


def create_method(cfg) -> Method:
    """The method named by ``cfg.method.name``, after its own config check (``ConfigError`` naming the key)."""
    raise_errors(method_config_errors(cfg))
    name = cfg.method.name
    try:
        method = METHODS.get(name)(cfg)
    except ConfigError:
        raise
    except Exception as err:  # a plug-in's own error, in one line
        if ":" not in name:
            raise
        raise ConfigError(f"method.name={name!r}: building it failed: {type(err).__name__}: {err}") from None
    if not isinstance(method, Method):
        raise ConfigError(f"method.name={name!r} returned a {type(method).__name__}, not a datkit.methods.Method")
    return method
