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

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


class Interval:
    """Element-wise bounds ``lower <= value <= upper`` of a batch of tensors.

    Affine layers work on ``(center, radius)`` and ReLU on ``(lower, upper)``; an interval keeps whichever
    form it was made in and computes (once) the other on demand, so a chain of layers converts only where
    it must. ``lower, upper = interval`` unpacks it.
    """

    __slots__ = ("_lower", "_upper", "_center", "_radius")

    def __init__(self, lower: torch.Tensor, upper: torch.Tensor) -> None:
        self._lower, self._upper = lower, upper
        self._center = self._radius = None

    @staticmethod
    def from_center_radius(center: torch.Tensor, radius: torch.Tensor) -> Interval:
        iv = Interval.__new__(Interval)
        iv._lower = iv._upper = None
        iv._center, iv._radius = center, radius
        return iv

    @property
    def lower(self) -> torch.Tensor:
        if self._lower is None:
            self._lower = self._center - self._radius
        return self._lower

    @property
    def upper(self) -> torch.Tensor:
        if self._upper is None:
            self._upper = self._center + self._radius
        return self._upper

    @property
    def center(self) -> torch.Tensor:
        if self._center is None:
            self._center = (self._upper + self._lower) * 0.5
        return self._center

    @property
    def radius(self) -> torch.Tensor:
        if self._radius is None:
            self._radius = (self._upper - self._lower) * 0.5
        return self._radius

    @property
    def shape(self) -> torch.Size:
        return (self._lower if self._lower is not None else self._center).shape

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Interval:
        """The interval of ``fn(value)`` for a linear ``fn`` with non-negative weights (a reshape, average
        pooling): ``fn`` is applied to whichever form is stored."""
        if self._center is not None:
            return Interval.from_center_radius(fn(self._center), fn(self._radius))
        return Interval(fn(self._lower), fn(self._upper))

    def __add__(self, other: Interval) -> Interval:
        if self._lower is not None and other._lower is not None:
            return Interval(self._lower + other._lower, self._upper + other._upper)
        return Interval.from_center_radius(self.center + other.center, self.radius + other.radius)

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.lower
        yield self.upper

    def __repr__(self) -> str:
        return f"Interval(shape={tuple(self.lower.shape)})"


class UnsupportedLayer(TypeError):
    """A layer, function or tensor method that has no bound rule (the message names it)."""


class Rule:
    """A layer type's bound rule; subclasses implement ``ibp`` and (for CROWN-IBP) ``backward``."""

    def ibp(self, step: Any, args: Sequence[Any], ctx: Any) -> Any:
        raise NotImplementedError

    def backward(self, step: Any, A: torch.Tensor,
                 ctx: Any) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor | None]:
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
