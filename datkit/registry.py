"""A name -> factory registry, shared by models, datasets, attacks, methods, optimizers, compressors and backends.

Modelled on timm's ``@register_model``: a factory registers itself under a name, and a lookup of an
unknown name fails with the list of known ones, so config errors are self-explaining.

Every registry also accepts a plug-in by import path, the form of setuptools entry points::

    model.name=mypkg.nets:make_net          # module mypkg.nets, attribute make_net
    method.name=my_methods:Mart.create      # dotted attributes are followed

The module is imported from ``sys.path``, to which the working directory is added (a script run as
``python path/to/script.py``, the deepspeed launcher's form, would otherwise not see it). A registry may
also own *prefixes*: ``torchvision:resnet18`` asks the models registry's ``torchvision`` resolver for
``resnet18`` instead of importing a module named ``torchvision``. Every failure (module not found, an
error while importing it, a missing attribute, not callable) raises :class:`PluginError`, whose one-line
message says why; the caller names the config key and the path in front of it.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class PluginError(LookupError):
    """A registry name or import path that does not resolve; the message names it and says why."""


def is_import_path(name: str) -> bool:
    """True for ``MODULE:ATTRIBUTE`` names (registered names never contain a colon)."""
    return ":" in name


def _ensure_cwd_on_path() -> None:
    cwd = os.getcwd()
    if not any(os.path.abspath(p or ".") == cwd for p in sys.path):
        sys.path.append(cwd)


def load_object(path: str) -> Any:
    """The object at ``MODULE:ATTRIBUTE`` (``ATTRIBUTE`` may be dotted), imported from ``sys.path`` + the working
    directory."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise PluginError("not of the form MODULE:CALLABLE (e.g. mypkg.nets:make_net)")
    _ensure_cwd_on_path()
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise PluginError(f"cannot import module '{module_name}' (no module named '{err.name}' on sys.path: "
                              f"the working directory {os.getcwd()} and PYTHONPATH)") from None
        raise PluginError(f"importing module '{module_name}' failed: ModuleNotFoundError: {err}") from None
    except Exception as err:  # noqa: BLE001 -- any error inside the user's module is reported in one line
        raise PluginError(f"importing module '{module_name}' failed: {type(err).__name__}: {err}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """Maps names to factories. ``kind`` is used in error messages ("unknown model 'x'; known: ...")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._prefixes: dict[str, Callable[[str], T]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@MODELS.register("cnn_small")`` above a factory function or class."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} '{name}' is registered twice")
            if is_import_path(name):
                raise KeyError(f"{self.kind} name '{name}' must not contain ':' (that form is an import path)")
            self._entries[name] = obj
            return obj

        return deco

    def register_prefix(self, prefix: str, resolve: Callable[[str], T]) -> None:
        """Names ``PREFIX:REST`` resolve through ``resolve(REST)`` (e.g. ``torchvision:resnet18``)."""
        self._prefixes[prefix] = resolve

    def get(self, name: str) -> T:
        """The factory registered as ``name``, or the callable at the import path ``MODULE:CALLABLE``.

        Unknown names raise a KeyError listing the known ones; an import path that does not resolve raises
        :class:`PluginError` naming the path and the cause."""
        if name in self._entries:
            return self._entries[name]
        if not is_import_path(name):
            raise KeyError(f"unknown {self.kind} '{name}'; known: {', '.join(self.names())} "
                           f"(or an import path MODULE:CALLABLE)") from None
        prefix, _, rest = name.partition(":")
        if prefix in self._prefixes:
            try:
                return self._prefixes[prefix](rest)
            except (ImportError, ValueError, KeyError) as err:
                raise PluginError(str(err.args[0] if err.args else err)) from None
        obj = load_object(name)
        if not callable(obj):
            raise PluginError(f"it is a {type(obj).__name__}, not a callable {self.kind} factory")
        return obj

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def prefixes(self) -> list[str]:
        """Prefixes with their own resolver (``torchvision``, ``timm``), sorted."""
        return sorted(self._prefixes)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
