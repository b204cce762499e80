"""Models from torchvision's model zoo and from timm, as datkit model factories.

``model.name=torchvision:resnet18`` and ``model.name=timm:resnet18`` resolve (through the ``torchvision`` and
``timm`` prefixes of the models registry) to :func:`external_factory`, whose factory has datkit's contract
``factory(num_classes, in_channels, image_size, **kwargs) -> nn.Module`` (inputs in [0, 1]; the normalization
is added outside, by :func:`~datkit.models.registry.create_model`).

* :func:`torchvision_model`: any classification model of ``torchvision.models``
  (``torchvision.models.list_models(module=torchvision.models)``), randomly initialised (``weights=None``), with a
  ``num_classes`` head; the first layer adapted to ``in_channels``; ResNet-like stems adapted to small images;
  size-aware builders (ViT's ``image_size``, MaxViT's ``input_size``) given the image size; GoogLeNet /
  Inception-v3 built without auxiliary heads.
* :func:`timm_model`: ``timm.create_model(name, pretrained=False, num_classes=..., in_chans=..., **kwargs)``, with
  ``img_size`` for the models that take it. timm is optional (``pip install timm`` or ``pip install 'datkit[timm]'``).

Both check the model with one dummy forward pass at the data's size, so a model that cannot run on
``image_size`` x ``image_size`` inputs fails when it is built, with a ValueError naming the model and the size.
torchvision and timm are imported only when a model is asked for.
"""
from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

EXTERNAL_PREFIXES = ("torchvision", "timm")

# Below this image size, ResNet-like stems (7x7 stride-2 conv1 + max-pool) become a 3x3 stride-1 conv1 and no
# max-pool, as in the CIFAR ResNets: the ImageNet stem would reduce a 32x32 image to 8x8 before the first block.
SMALL_IMAGE_SIZE = 64

_TIMM_MISSING = "timm is not installed: pip install timm (or pip install 'datkit[timm]')"
_UNEXPECTED_KWARG = re.compile(r"unexpected keyword argument '([^']+)'")


# ---------------------------------------------------------------------------------------------------- helpers


def _one_line(err: BaseException, limit: int = 300, with_type: bool = True) -> str:
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    if not with_type:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _unknown_name(kind: str, name: str, known: list[str], hint: str) -> ValueError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    did_you_mean = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown {kind} model '{name}'{did_you_mean} (see {hint})")


def _build(label: str, build: Callable[..., nn.Module], kwargs: dict[str, Any], optional: dict[str, Any],
           size: str) -> nn.Module:
    """``build(**kwargs, **optional)``, leaving out each ``optional`` keyword the model does not take.

    The keywords of ``optional`` (``image_size``, ``aux_logits``, ...) are only meaningful to some models, and a
    builder's ``**kwargs`` go to the model class, so "accepts it" is learnt from the class's TypeError (raised
    before anything is allocated). ``kwargs`` (the user's) win over ``optional``. A keyword the model does not
    take in ``kwargs`` raises a TypeError naming the model; any other failure a ValueError naming the model."""
    optional = {k: v for k, v in optional.items() if k not in kwargs}
    while True:
        try:
            return build(**kwargs, **optional)
        except TypeError as err:
            match = _UNEXPECTED_KWARG.search(str(err))
            if match and match.group(1) in optional:
                del optional[match.group(1)]
                continue
            raise TypeError(f"{label}: {_one_line(err, with_type=False)}") from None
        except Exception as err:  # the builder's own error (e.g. a size it refuses), in one line
            raise ValueError(f"{label} could not be built ({size}): {_one_line(err)}") from err


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def _adapt_small_image_stem(model: nn.Module, in_channels: int) -> bool:
    """ResNet-like stem (``conv1`` an ``nn.Conv2d`` and ``maxpool`` an ``nn.MaxPool2d``, as in torchvision's
    ResNet / ResNeXt / Wide ResNet): a 3x3 stride-1 ``conv1`` and no max-pool. False (nothing changed) otherwise."""
    conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(pool, nn.MaxPool2d) or conv.groups != 1:
        return False
    new = nn.Conv2d(in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # torchvision ResNet's conv init
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    model.conv1 = new
    model.maxpool = nn.Identity()
    return True


def _adapt_input_conv(model: nn.Module, in_channels: int, label: str) -> None:
    """Replace the first ``nn.Conv2d`` (in module order) by one with ``in_channels`` inputs and otherwise the same
    arguments. Its weights come from the old ones, as timm's ``adapt_input_conv`` does: summed over the input
    channels for 1 channel (right for grayscale images with pretrained weights, and the fan-in scaling of a random
    init), else repeated and scaled by ``old_in / in_channels``."""
    found = next(((path, m) for path, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None:
        raise ValueError(f"{label}: cannot adapt it to in_channels={in_channels}: it has no nn.Conv2d")
    path, conv = found
    if conv.in_channels == in_channels:
        return
    if conv.groups != 1:
        raise ValueError(f"{label}: cannot adapt its first conv '{path}' (groups={conv.groups}) "
                         f"to in_channels={in_channels}")
    new = nn.Conv2d(in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=1, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        old = conv.weight
        if in_channels == 1:
            new.weight.copy_(old.sum(dim=1, keepdim=True))
        else:
            reps = math.ceil(in_channels / conv.in_channels)
            new.weight.copy_(old.repeat(1, reps, 1, 1)[:, :in_channels] * (conv.in_channels / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _set_submodule(model, path, new)


def _check_forward(model: nn.Module, label: str, num_classes: int, in_channels: int, image_size: int) -> None:
    """One forward pass of a ``(1, in_channels, image_size, image_size)`` zero tensor, in eval mode and without
    gradients (each module's train/eval mode is restored): a model that cannot run at this size, or whose output
    is not a ``(1, num_classes)`` tensor, raises a ValueError naming the model and the size."""
    param = next(model.parameters(), None)
    x = torch.zeros(1, in_channels, image_size, image_size,
                    device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None and param.is_floating_point() else None)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # noqa: BLE001 -- any failure at this size is reported as one
        raise ValueError(f"{label} cannot run on {in_channels}x{image_size}x{image_size} inputs "
                         f"(in_channels={in_channels}, image_size={image_size}): {_one_line(err)}; if image_size "
                         f"is too small for it, use a larger one (resize the data) or another model") from None
    finally:
        for m, training in modes:
            m.training = training
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{label} returns a {type(out).__name__}, not a tensor of logits")
    if tuple(out.shape) != (1, num_classes):
        raise ValueError(f"{label} returns logits of shape {tuple(out.shape)} for one "
                         f"{in_channels}x{image_size}x{image_size} input, expected (1, {num_classes})")


# ---------------------------------------------------------------------------------------------------- torchvision


def _torchvision_names() -> list[str]:
    import torchvision  # lazy: torchvision is heavy to import

    return torchvision.models.list_models(module=torchvision.models)


def _check_torchvision_name(name: str) -> None:
    names = _torchvision_names()
    if name not in names:
        raise _unknown_name("torchvision", name, names, "torchvision.models.list_models()")


def torchvision_model(name: str, *, num_classes: int, in_channels: int, image_size: int,
                      small_image_stem: bool | None = None, **kwargs: Any) -> nn.Module:
    """A classification model of ``torchvision.models``, adapted to the data.

    ``torchvision.models.get_model_builder(name)(weights=None, num_classes=num_classes, **kwargs)``; ``kwargs`` go
    to the model class (e.g. ``dropout``, ``stochastic_depth_prob``). Besides:

    * ``image_size`` (ViT) / ``input_size`` (MaxViT) is passed to the builders whose model takes it;
    * GoogLeNet and Inception-v3 are built with ``aux_logits=False`` (their train-mode forward would otherwise
      return auxiliary outputs) and ``init_weights=True`` (their default, without the FutureWarning); a model
      left with auxiliary heads (``aux_logits=True``) is refused;
    * ``in_channels != 3``: the first ``nn.Conv2d`` is replaced by one with ``in_channels`` inputs;
    * ``small_image_stem`` (default: ``image_size < 64`` and no ``weights``): a ResNet-like stem (``conv1`` +
      ``maxpool``) becomes a 3x3 stride-1 ``conv1`` and no max-pool; ``True`` asks for it (a ValueError if the
      model has no such stem), ``False`` keeps the ImageNet stem.

    ``weights`` may be passed (a ``torchvision.models`` weights enum or its name), for weights that are cached:
    torchvision then requires ``num_classes`` (and a ViT's ``image_size``) to be the weights' own.
    Finally one dummy forward pass checks that the model runs at ``image_size`` (see :func:`_check_forward`).
    Unknown names raise a ValueError with close matches.
    """
    _check_torchvision_name(name)
    import torchvision

    label = f"torchvision model '{name}'"
    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights": None, **kwargs, "num_classes": num_classes}
    optional: dict[str, Any] = {"image_size": image_size, "input_size": (image_size, image_size)}
    if kwargs["weights"] is None:  # with weights, torchvision's builders set these themselves
        optional.update(aux_logits=False, init_weights=True)
    model = _build(label, builder, kwargs, optional,
                   f"num_classes={num_classes}, in_channels={in_channels}, image_size={image_size}")
    if getattr(model, "aux_logits", False):
        raise ValueError(f"{label} with aux_logits=True returns auxiliary outputs in train mode; datkit needs a "
                         f"tensor of logits: leave aux_logits out (or set aux_logits=False)")
    if small_image_stem is None:
        small_image_stem = image_size < SMALL_IMAGE_SIZE and kwargs["weights"] is None
        if small_image_stem:
            _adapt_small_image_stem(model, in_channels)
    elif small_image_stem and not _adapt_small_image_stem(model, in_channels):
        raise ValueError(f"{label}: small_image_stem=True, but it has no ResNet-like stem "
                         f"(an nn.Conv2d 'conv1' and an nn.MaxPool2d 'maxpool')")
    _adapt_input_conv(model, in_channels, label)
    _check_forward(model, label, num_classes, in_channels, image_size)
    return model


# ---------------------------------------------------------------------------------------------------- timm


def _import_timm() -> Any:
    try:
        import timm
    except ModuleNotFoundError as err:
        if err.name == "timm":
            raise ImportError(_TIMM_MISSING) from None
        raise ImportError(f"importing timm failed: {_one_line(err)} (reinstall it: pip install -U timm)") from err
    except ImportError as err:
        raise ImportError(f"importing timm failed: {_one_line(err)} (reinstall it: pip install -U timm)") from err
    return timm


def _check_timm_name(name: str) -> None:
    timm = _import_timm()
    if ":" in name:  # hf-hub:ORG/NAME, local-dir:PATH: timm resolves these itself
        return
    if not timm.is_model(name):
        raise _unknown_name("timm", name, timm.list_models(), "timm.list_models()")


def timm_model(name: str, *, num_classes: int, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)``.

    ``img_size=image_size`` is passed to the models that take it (ViT, Swin, ...; timm's models take sizes through
    their class, so one that does not take it is built without); ``kwargs`` win over it (``pretrained=True`` too,
    for weights that are cached). One dummy forward pass checks that the model runs at ``image_size``. timm is
    optional: without it an ImportError says how to install it; unknown names raise a ValueError with close matches.
    """
    _check_timm_name(name)
    timm = _import_timm()
    label = f"timm model '{name}'"
    kwargs = {"pretrained": False, **kwargs, "num_classes": num_classes, "in_chans": in_channels}
    model = _build(label, lambda **kw: timm.create_model(name, **kw), kwargs, {"img_size": image_size},
                   f"num_classes={num_classes}, in_channels={in_channels}, image_size={image_size}")
    _check_forward(model, label, num_classes, in_channels, image_size)
    return model


# ---------------------------------------------------------------------------------------------------- factory


def external_factory(prefix: str, name: str) -> Callable[..., nn.Module]:
    """The factory ``factory(num_classes, in_channels, image_size, **kwargs)`` of ``PREFIX:NAME``
    (``('torchvision', 'resnet18')``, ``('timm', 'resnet18')``).

    The name is checked now (an unknown name raises a ValueError with close matches; ``timm`` not installed an
    ImportError), so that a config error shows before any model is built."""
    if prefix == "torchvision":
        _check_torchvision_name(name)
        build: Callable[..., nn.Module] = torchvision_model
    elif prefix == "timm":
        _check_timm_name(name)
        build = timm_model
    else:
        raise ValueError(f"unknown model prefix '{prefix}'; known: {', '.join(EXTERNAL_PREFIXES)}")

    def factory(num_classes: int, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module:
        return build(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)

    factory.__name__ = factory.__qualname__ = f"{prefix}:{name}"
    factory.__doc__ = f"``{prefix}:{name}`` (see :func:`datkit.models.external.{build.__name__}`)."
    return factory


__all__ = ["EXTERNAL_PREFIXES", "SMALL_IMAGE_SIZE", "external_factory", "timm_model", "torchvision_model"]
