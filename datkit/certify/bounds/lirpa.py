"""The optional ``auto_lirpa`` engine: margins and intermediate bounds from auto_LiRPA, when it is installed.

auto_LiRPA (Xu et al., "Automatic Perturbation Analysis for Scalable Certified Robustness and Beyond",
NeurIPS 2020; https://github.com/Verified-Intelligence/auto_LiRPA) is what Shi et al. 2021 trained with.
Its only PyPI release (0.3, 2022) pins ``torch<1.13`` and does not import on current torch, so it is not a
dependency: install it from source to use ``bounds.engine=auto_lirpa``. The calls below follow the
authors' training code (``compute_bounds`` with ``IBP`` and ``CROWN-IBP``, a specification matrix ``C``,
ReLU pre-activation bounds read from the ``BoundRelu`` nodes). This path is not exercised by datkit's
tests, which run where auto_LiRPA cannot be installed; only its error message is.
"""
from __future__ import annotations

import importlib.util
import weakref

import torch
from torch import nn

from .api import Margins, input_box, num_classes_of, spec_matrix
from .core import Interval

INSTALL_HINT = ("auto_LiRPA is not importable. Its PyPI release (0.3) does not work with current torch; install it "
                "from source (pip install git+https://github.com/Verified-Intelligence/auto_LiRPA), or use "
                "bounds.engine=native (datkit's own IBP / CROWN-IBP, the default)")

_BOUNDED: weakref.WeakKeyDictionary[nn.Module, object] = weakref.WeakKeyDictionary()


def auto_lirpa_available() -> bool:
    """True when ``import auto_LiRPA`` can succeed."""
    return importlib.util.find_spec("auto_LiRPA") is not None


def require_auto_lirpa() -> None:
    """Raise ``ImportError`` with installation advice when auto_LiRPA is missing or does not import."""
    if not auto_lirpa_available():
        raise ImportError(f"bounds.engine=auto_lirpa: {INSTALL_HINT}")
    try:
        import auto_LiRPA  # noqa: F401
    except Exception as err:  # an old release fails on import with current torch
        raise ImportError(f"bounds.engine=auto_lirpa: importing auto_LiRPA failed ({type(err).__name__}: {err}); "
                          f"{INSTALL_HINT}") from err


def _bounded_module(model: nn.Module, x: torch.Tensor):
    from auto_LiRPA import BoundedModule

    bounded = _BOUNDED.get(model)
    if bounded is None:
        bounded = _BOUNDED[model] = BoundedModule(model, torch.zeros_like(x[:1]), device=x.device)
    return bounded


def lirpa_margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str, *,
                  beta: float = 1.0, num_classes: int | None = None):
    """Like the native engine's ``certified_margins``, computed by auto_LiRPA (see the module docstring)."""
    from auto_LiRPA import BoundedTensor, PerturbationLpNorm


    bounded = _bounded_module(model, x)
    box = input_box(x, eps)
    bx = BoundedTensor(x, PerturbationLpNorm(norm=float("inf"), eps=eps, x_L=box.lower, x_U=box.upper))
    C = spec_matrix(y, num_classes or num_classes_of(model)).to(x.dtype)
    bounded(bx)  # the clean pass: BatchNorm statistics for the bounds, as in auto_LiRPA's training examples
    lower, _ = bounded.compute_bounds(x=(bx,), C=C, method="IBP", bound_upper=False)
    if method == "crown-ibp" and beta > 0:
        crown, _ = bounded.compute_bounds(x=(bx,), C=C, method="CROWN-IBP", bound_upper=False)
        lower = beta * crown + (1.0 - beta) * lower
    relu_inputs = [Interval(m.inputs[0].lower, m.inputs[0].upper) for m in bounded.modules()
                   if type(m).__name__ == "BoundRelu"]
    normalize = getattr(model, "normalize", None)
    net_in = Interval(normalize(box.lower), normalize(box.upper)) if normalize is not None else box
    return Margins(lower, relu_inputs, net_in)
