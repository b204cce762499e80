"""The computation graph that bounds are propagated through, traced with ``torch.fx``.

A model is symbolically traced once (and cached per model object): modules with a bound rule, and
every built-in ``torch.nn`` module, are leaves; any other module (``NormalizedModel``, a residual
block, a ResNet) is traced *through*, so residual additions (``out + shortcut``) and functional calls
(``F.relu``, ``torch.flatten``, ``x.view(x.size(0), -1)``) appear as graph nodes with rules of their
own. No model needs to be written for the engine: anything built from supported layers is handled,
and the first layer, function or method without a rule fails with ``UnsupportedLayer`` naming it.

Modules are looked up by their qualified name on every call, so a model whose BatchNorm layers were
converted to ``SyncBatchNorm`` after tracing is still bounded with the layers it now has.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from .core import FUNCTION_RULES, METHOD_RULES, Rule, UnsupportedLayer, module_rule, supported_layers


class Ref:
    """A reference to the value of an earlier step (replaces fx nodes in a step's arguments)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Ref({self.name})"


@dataclass
class Step:
    """One node of the traced graph: its rule, its (fx) arguments and the names of its node inputs."""

    name: str
    op: str  # placeholder | call_module | call_function | call_method
    target: Any  # module qualified name, function, or method name
    args: tuple  # with Ref in place of fx nodes
    kwargs: dict
    inputs: tuple[str, ...]
    label: str
    rule: Rule | None = None
    module: nn.Module | None = field(default=None, repr=False)


class _Tracer(fx.Tracer):
    """Leaves: modules with a bound rule and built-in torch.nn modules (so unsupported ones are named)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_rule(m) is not None or super().is_leaf_module(m, module_qualified_name)


def _label(node: fx.Node, model: nn.Module) -> str:
    if node.op == "call_module":
        return f"layer '{node.target}' ({type(model.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f"tensor method .{node.target}()"
    return f"{node.op} '{node.target}'"


def _unsupported(what: str) -> UnsupportedLayer:
    return UnsupportedLayer(f"datkit.certify: no bound rule for {what}; supported: {', '.join(supported_layers())}")


class BoundGraph:
    """The traced steps of ``model`` in topological order, with the names of its input and output."""

    def __init__(self, model: nn.Module) -> None:
        try:
            graph = _Tracer().trace(model)
        except Exception as err:  # data-dependent control flow and the like
            raise UnsupportedLayer(f"datkit.certify: cannot trace {type(model).__name__} with torch.fx for bound "
                                   f"propagation ({type(err).__name__}: {err})") from err
        self.steps: list[Step] = []
        self.input_name = self.output_name = ""
        for node in graph.nodes:
            if node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node):
                    raise UnsupportedLayer("datkit.certify: the model must return a single tensor of logits")
                self.output_name = out.name
                continue
            if node.op == "placeholder":
                if self.input_name:
                    raise UnsupportedLayer("datkit.certify: the model must take exactly one input tensor")
                self.input_name = node.name
            elif node.op == "get_attr":
                raise _unsupported(f"a tensor attribute used directly in forward ('{node.target}')")
            args = fx.node.map_arg(node.args, lambda n: Ref(n.name))
            kwargs = fx.node.map_arg(dict(node.kwargs), lambda n: Ref(n.name))
            step = Step(node.name, node.op, node.target, args, kwargs,
                        tuple(n.name for n in node.all_input_nodes), _label(node, model))
            step.rule = self._static_rule(node, model)
            self.steps.append(step)
        self.consumers: dict[str, list[str]] = {s.name: [] for s in self.steps}
        for step in self.steps:
            for name in step.inputs:
                self.consumers[name].append(step.name)
        self.consumers[self.output_name].append("output")

    @staticmethod
    def _static_rule(node: fx.Node, model: nn.Module) -> Rule | None:
        if node.op == "placeholder":
            return None
        if node.op == "call_module":
            rule = module_rule(model.get_submodule(node.target))
        elif node.op == "call_function":
            rule = FUNCTION_RULES.get(node.target)
        else:
            rule = METHOD_RULES.get(node.target)
        if rule is None:
            raise _unsupported(_label(node, model))
        return rule

    def bind(self, model: nn.Module) -> list[Step]:
        """The steps with their current modules (and the rules of those modules' types)."""
        for step in self.steps:
            if step.op == "call_module":
                step.module = model.get_submodule(step.target)
                rule = module_rule(step.module)
                if rule is None:
                    raise _unsupported(f"layer '{step.target}' ({type(step.module).__name__})")
                step.rule = rule
        return self.steps


_CACHE: weakref.WeakKeyDictionary[nn.Module, BoundGraph] = weakref.WeakKeyDictionary()


def graph_of(model: nn.Module) -> BoundGraph:
    """The (cached) traced graph of ``model``."""
    graph = _CACHE.get(model)
    if graph is None:
        graph = _CACHE[model] = BoundGraph(model)
    return graph
