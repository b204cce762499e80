"""datkit: distributed adversarial and certified robust training for PyTorch.

``datkit.fit(model, train_set, test_set, config=None, overrides=())`` trains your own model on your own data
(``datkit.api``); ``python -m datkit.train`` is the command line. Imported lazily: ``import datkit`` stays cheap.
"""
from __future__ import annotations

from typing import Any

__all__ = ["fit"]


def __getattr__(name: str) -> Any:
    if name == "fit":
        from .api import fit

        return fit
    raise AttributeError(f"module 'datkit' has no attribute '{name}'")
