"""Certified robustness: bound propagation (IBP, CROWN-IBP) and randomized smoothing.

Public API (imported lazily so that ``import datkit.certify`` stays cheap):

- ``ibp_bounds(model, x, eps)``, ``crown_ibp_bounds(model, x, eps)``, ``crown_bounds(model, x, eps)``: logit
  bounds over the l_inf ball (``datkit.certify.bounds``, Shi et al. 2021 / Zhang et al. 2020 / Zhang et al. 2018);
- ``Smooth(model, num_classes, sigma)``: randomized smoothing, ``predict`` and ``certify``
  (``datkit.certify.smoothed_classifier``, Cohen et al. 2019).
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ibp_bounds": "datkit.certify.bounds",
    "crown_ibp_bounds": "datkit.certify.bounds",
    "crown_bounds": "datkit.certify.bounds",
    "Smooth": "datkit.certify.smoothed_classifier",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'datkit.certify' has no attribute '{name}'")


__all__ = sorted(_EXPORTS)
