"""Training methods (registry ``METHODS``; ``method.name`` in the config): clean, pgd, fgsm and nfgsm (the DAT
objective; N-FGSM), trades, smoothing (Gaussian noise / SmoothAdv), ibp / crown-ibp (certified training, Shi et al.
2021), and mtl-ibp / cc-ibp / sabr (certified training with a PGD point); a ``MODULE:CALLABLE`` import path names
your own."""
from . import adversarial, certified, certified_attacked, clean, smoothing, trades  # noqa: F401  (register)
from .base import METHODS, Method, StepInfo, create_method, method_config_errors

__all__ = ["METHODS", "Method", "StepInfo", "create_method", "method_config_errors"]
