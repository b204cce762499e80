"""Training methods (registry ``METHODS``): clean, pgd, fgsm (DAT objective), trades, smoothing (Gaussian noise / SmoothAdv)."""
from . import adversarial, clean, smoothing, trades  # noqa: F401  (register)
from .base import METHODS, Method, StepInfo, create_method

__all__ = ["METHODS", "Method", "StepInfo", "create_method"]
