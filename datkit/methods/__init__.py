"""Training methods (registry ``METHODS``): clean, pgd, fgsm (DAT objective), trades."""
from . import adversarial, clean, trades  # noqa: F401  (register)
from .base import METHODS, Method, StepInfo, create_method

__all__ = ["METHODS", "Method", "StepInfo", "create_method"]
