"""Training methods (registry ``METHODS``): clean, pgd, fgsm (DAT objective), trades, smoothing (Gaussian noise / SmoothAdv),
ibp / crown-ibp (certified training, Shi et al. 2021), mtl-ibp / cc-ibp / sabr (certified training with a PGD point)."""
from . import adversarial, certified, certified_attacked, clean, smoothing, trades  # noqa: F401  (register)
from .base import METHODS, Method, StepInfo, create_method, method_config_errors

__all__ = ["METHODS", "Method", "StepInfo", "create_method", "method_config_errors"]
