"""Bound rules of the structural operations: identity, flatten / reshape, shape queries, residual addition.

- identity (``nn.Identity``, ``Dropout`` in eval mode or with p=0, ``.contiguous()``): bounds pass through;
- reshapes (``nn.Flatten``, ``torch.flatten``, ``.view``, ``.reshape``, ``.flatten``) that keep the
  batch dimension: applied to both bounds; backward, ``A`` is reshaped to the input's shape;
- shape queries (``x.size(0)``, ``x.shape``, indexing a shape): evaluated on the lower bound (they
  return numbers, not tensors);
- addition of two bounded tensors (``out + shortcut``, ``out += shortcut``, ``torch.add``): the
  bounds add, and backward ``A`` flows unchanged into both operands (residual connections).
"""
from __future__ import annotations

import builtins
import operator

import torch
from torch import nn

from .core import Interval, Rule, UnsupportedLayer, register_function, register_method, register_module
from .graph import Ref


@register_module(nn.Identity, nn.Dropout)
@register_method("contiguous")
class IdentityRule(Rule):
    """Bounds pass through unchanged (Dropout only in eval mode or with p = 0)."""

    def ibp(self, step, args, ctx):
        m = step.module
        if isinstance(m, nn.Dropout) and m.training and m.p > 0:
            raise UnsupportedLayer(f"datkit.certify: {step.label} with p={m.p} in training mode (bounds need a "
                                   "deterministic network: use p=0, or bound the model in eval mode)")
        return args[0]

    def backward(self, step, A, ctx):
        return [(step.args[0].name, A)], None


def _apply(step, t: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
    if step.op == "call_module":
        return step.module(t)
    if step.op == "call_method":
        return getattr(t, step.target)(*rest, **kwargs)
    return step.target(t, *rest, **kwargs)


@register_module(nn.Flatten)
@register_function(torch.flatten, torch.reshape)
@register_method("view", "reshape", "flatten")
class ReshapeRule(Rule):
    """A reshape that keeps dimension 0 (the batch)."""

    def ibp(self, step, args, ctx):
        iv, rest = args[0], tuple(args[1:])
        kwargs = ctx.kwargs(step)
        out = iv.map(lambda t: _apply(step, t, rest, kwargs))
        if out.shape[0] != iv.shape[0]:
            raise UnsupportedLayer(f"datkit.certify: {step.label} changes the batch dimension "
                                   f"({tuple(iv.shape)} -> {tuple(out.shape)})")
        return out

    def backward(self, step, A, ctx):
        name = step.args[0].name
        return [(name, A.reshape(*A.shape[:2], *ctx.shape(name)[1:]))], None


@register_method("size")
@register_function(builtins.getattr, operator.getitem)
class ShapeQueryRule(Rule):
    """``x.size(...)``, ``x.shape``, ``shape[i]``: numbers computed from the lower bound's shape."""

    def ibp(self, step, args, ctx):
        vals = [a.lower if isinstance(a, Interval) else a for a in args]
        if step.op == "call_method":
            out = getattr(vals[0], step.target)(*vals[1:], **ctx.kwargs(step))
        else:
            out = step.target(*vals, **ctx.kwargs(step))
        if isinstance(out, torch.Tensor):
            raise UnsupportedLayer(f"datkit.certify: no bound rule for {step.label} applied to a tensor")
        return out


@register_function(operator.add, operator.iadd, torch.add)
class AddRule(Rule):
    """``a + b`` of two bounded tensors (residual connections)."""

    def ibp(self, step, args, ctx):
        if len(args) != 2 or ctx.kwargs(step) or not all(isinstance(a, Interval) for a in args):
            raise UnsupportedLayer(f"datkit.certify: {step.label} must add exactly two outputs of earlier layers "
                                   "(constants and alpha= are not supported)")
        return args[0] + args[1]

    def backward(self, step, A, ctx):
        return [(a.name, A) for a in step.args if isinstance(a, Ref)], None
