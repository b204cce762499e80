"""Shared types of the bound engine: the interval, the rule interface and its registries, the error.

A *rule* is what one layer type contributes to bound propagation (one small class per type, in
``rules_affine.py``, ``rules_relu.py``, ``rules_shape.py`` and ``batchnorm.py``):

- ``ibp(step, args, ctx)``: the interval of the layer's output given the intervals of its inputs
  (interval bound propagation, Gowal et al. 2018, "On the Effectiveness of Interval Bound
  Propagation for Training Verifiably Robust Models");
- ``backward(step, A, ctx)``: given the linear function ``A @ out`` of the layer's output that is being
  lower-bounded, pairs ``(input name, A_i)`` and a constant ``bias`` such that
  ``A @ out >= sum_i A_i @ in_i + bias`` over the inputs' intervals (the backward pass of CROWN,
  Zhang et al. 2018, "Efficient Neural Network Robustness Certification with General Activation
  Functions", used with IBP intermediate bounds as in CROWN-IBP, Zhang et al., ICLR 2020).

``A`` always has shape ``(batch, rows, *layer_output_shape[1:])``: one row per bounded quantity.
Rules are looked up by module type (through the MRO, so ``SyncBatchNorm`` finds the BatchNorm rule
unless it has its own), by function (``F.relu``, ``operator.add``) or by tensor-method name (``view``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn


class Interval(NamedTuple):
    """Element-wise bounds ``lower <= value <= upper`` of a batch of tensors."""

    lower: torch.Tensor
    upper: torch.Tensor

    @property
    def center(self) -> torch.Tensor:
        return (self.upper + self.lower) / 2

    @property
    def radius(self) -> torch.Tensor:
        return (self.upper - self.lower) / 2

    @staticmethod
    def from_center_radius(center: torch.Tensor, radius: torch.Tensor) -> "Interval":
        return Interval(center - radius, center + radius)


class UnsupportedLayer(TypeError):
    """A layer, function or tensor method that has no bound rule (the message names it)."""


class Rule:
    """A layer type's bound rule; subclasses implement ``ibp`` and (for CROWN-IBP) ``backward``."""

    def ibp(self, step: Any, args: Sequence[Any], ctx: Any) -> Any:
        raise NotImplementedError

    def backward(self, step: Any, A: torch.Tensor, ctx: Any) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor | None]:
        """``([(input name, A_i), ...], bias of shape (batch, rows) or None)``."""
        raise UnsupportedLayer(f"{step.label}: no CROWN (backward) rule; only IBP is available for this layer")


MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Callable[..., Any], Rule] = {}
METHOD_RULES: dict[str, Rule] = {}


def register_module(*types: type) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: the rule (instantiated once) handles modules of ``types`` and their subclasses."""

    def deco(cls: type[Rule]) -> type[Rule]:
        for t in types:
            MODULE_RULES[t] = cls()
        return cls

    return deco


def register_function(*fns: Callable[..., Any]) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: the rule handles ``call_function`` nodes of these functions."""

    def deco(cls: type[Rule]) -> type[Rule]:
        for f in fns:
            FUNCTION_RULES[f] = cls()
        return cls

    return deco


def register_method(*names: str) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: the rule handles ``tensor.<name>(...)`` calls."""

    def deco(cls: type[Rule]) -> type[Rule]:
        for n in names:
            METHOD_RULES[n] = cls()
        return cls

    return deco


def module_rule(module: nn.Module) -> Rule | None:
    """The rule of the closest class in ``type(module)``'s MRO that has one, else None."""
    for cls in type(module).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    return None


def supported_layers() -> list[str]:
    """Names of every module type, function and tensor method with a rule (for error messages)."""
    names = [t.__name__ for t in MODULE_RULES] + [getattr(f, "__name__", str(f)) for f in FUNCTION_RULES]
    return sorted(set(names)) + sorted(f"Tensor.{m}" for m in METHOD_RULES)


def rows_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension after (batch, rows): ``(B, K, ...) -> (B, K)``."""
    return t.flatten(2).sum(-1) if t.dim() > 2 else t
