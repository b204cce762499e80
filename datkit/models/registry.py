"""The model registry and :func:`create_model`.

Factories register with ``@MODELS.register("name")`` and have the signature
``factory(num_classes: int, in_channels: int, image_size: int, **kwargs) -> nn.Module``
(the ``@register_model`` pattern of timm). :func:`create_model` wraps the network in a
:class:`~datkit.models.normalize.NormalizedModel`, so inputs are always in [0, 1].
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from datkit.models.normalize import Normalize, NormalizedModel
from datkit.registry import PluginError, Registry, is_import_path

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")

_FIXED_ARGS = ("num_classes", "in_channels", "image_size")


def _external(prefix: str) -> Callable[[str], ModelFactory]:
    def resolve(name: str) -> ModelFactory:
        from datkit.models.external import external_factory  # torchvision's model zoo / timm, imported on use

        return external_factory(prefix, name)

    return resolve


for _prefix in ("torchvision", "timm"):  # model.name=torchvision:resnet18, timm:resnet18
    MODELS.register_prefix(_prefix, _external(_prefix))


def model_config_errors(cfg) -> list[str]:
    """Errors in ``cfg.model``: ``model.name`` is registered, ``torchvision:NAME`` / ``timm:NAME``, or an importable
    ``MODULE:CALLABLE`` (called when the model is built)."""
    try:
        MODELS.get(cfg.model.name)
    except (KeyError, PluginError) as err:
        return [f"model.name={cfg.model.name!r}: {err.args[0]}"]
    return []


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return MODELS.names()


def _check_kwargs(name: str, factory: ModelFactory, kwargs: dict[str, Any]) -> None:
    """Raise a TypeError naming the model and the bad kwarg(s) for keywords the factory does not take."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the factory validates its own kwargs
    accepted = [n for n, p in params.items()
                if n not in _FIXED_ARGS
                and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    bad = sorted(k for k in kwargs if k not in accepted)
    if bad:
        raise TypeError(f"model '{name}' got unexpected keyword argument(s) {', '.join(repr(b) for b in bad)}; "
                        f"accepted: {', '.join(accepted) if accepted else '(none)'}")


def create_model(name: str, num_classes: int, in_channels: int = 1, image_size: int = 28,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                 **kwargs: Any) -> NormalizedModel:
    """Build model ``name`` and wrap it as ``NormalizedModel(Normalize(mean, std), net)``.

    Inputs to the returned model are in [0, 1] pixel units. Unknown names raise ``KeyError`` listing
    the known ones; keyword arguments the model does not accept raise ``TypeError``; a ``mean``/``std``
    whose length is neither 1 nor ``in_channels`` raises ``ValueError``.
    """
    factory = MODELS.get(name)
    if num_classes < 1:
        raise ValueError(f"model '{name}': num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"model '{name}': in_channels must be >= 1, got {in_channels}")
    if image_size < 1:
        raise ValueError(f"model '{name}': image_size must be >= 1, got {image_size}")
    _check_kwargs(name, factory, kwargs)
    try:
        net = factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    except Exception as err:  # a plug-in's own error, in one line
        if not is_import_path(name) or name.partition(":")[0] in MODELS.prefixes():  # prefixes say it themselves
            raise
        raise ValueError(f"model '{name}': calling it (num_classes={num_classes}, in_channels={in_channels}, "
                         f"image_size={image_size}, kwargs {kwargs}) failed: {type(err).__name__}: {err}") from None
    if not isinstance(net, nn.Module):
        raise TypeError(f"model '{name}' returned a {type(net).__name__}, not a torch.nn.Module")
    return wrap_model(net, mean, std, in_channels)


def wrap_model(net: nn.Module, mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
               in_channels: int = 1) -> NormalizedModel:
    """``NormalizedModel(Normalize(mean, std), net)``: the form every datkit model has (inputs in [0, 1])."""
    return NormalizedModel(Normalize(mean, std, in_channels=in_channels), net)
