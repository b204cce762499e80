"""datkit's native bound engine: IBP and CROWN-IBP over any model built from supported layers.

    from datkit.certify import ibp_bounds, crown_ibp_bounds
    lb, ub = ibp_bounds(model, x, eps)        # bounds of the logits over {x' : |x'-x|_inf <= eps} ∩ [0,1]^d
    lb, ub = crown_ibp_bounds(model, x, eps)  # CROWN-IBP: backward linear bounds with IBP intermediates
    lb, ub = crown_bounds(model, x, eps)      # full CROWN: intermediates by CROWN too (never looser than CROWN-IBP)
    m = margin_bounds(model, x, y, eps, "crown-ibp", beta=0.5)  # lower bounds of f_y - f_j, j != y
    fused_loss(model, x, y, eps, beta=0.5).loss  # upper bound of the robust cross-entropy, one backward row

The model is traced with ``torch.fx`` (:mod:`.graph`); each layer type has one small rule
(:mod:`.rules_affine`: Linear, Conv2d, Normalize, AvgPool2d / AdaptiveAvgPool2d; :mod:`.batchnorm`:
BatchNorm1d/2d and SyncBatchNorm in train and eval mode; :mod:`.rules_relu`: ReLU; :mod:`.rules_shape`:
Identity, Dropout (eval), Flatten / view / reshape, residual addition). A layer without a rule fails
with :class:`UnsupportedLayer` naming it; a new layer type gets its rule with ``@register_module(MyLayer)`` on a
:class:`Rule` subclass. :mod:`.loss_fusion` bounds the cross-entropy itself (Xu et al. 2020's loss fusion, CROWN-IBP
training). ``auto_lirpa`` (:mod:`.lirpa`) is an optional second engine.
"""
from . import batchnorm, rules_affine, rules_relu, rules_shape  # noqa: F401  (register the rules)
from .api import (
                  BOUND_METHODS,
                  MarginBounds,
                  bound_state,
                  crown_ibp_bounds,
                  ibp_bounds,
                  input_box,
                  margin_bounds,
                  num_classes_of,
                  spec_matrix,
)
from .batchnorm import clean_batch_stats, record_batch_stats
from .core import (
                  Interval,
                  Rule,
                  UnsupportedLayer,
                  register_function,
                  register_method,
                  register_module,
                  supported_layers,
)
from .crown import VERIFY_BOUND_METHODS, crown_bounds, verified
from .graph import BoundGraph, graph_of
from .loss_fusion import FusedLoss, fused_bound, fused_cross_entropy, fused_loss
from .propagate import BoundState

__all__ = ["BOUND_METHODS", "VERIFY_BOUND_METHODS", "BoundGraph", "BoundState", "FusedLoss", "Interval",
           "MarginBounds", "Rule", "UnsupportedLayer", "bound_state", "clean_batch_stats", "crown_bounds",
           "crown_ibp_bounds", "fused_bound", "fused_cross_entropy", "fused_loss", "graph_of", "ibp_bounds",
           "input_box", "margin_bounds", "num_classes_of", "record_batch_stats", "register_function",
           "register_method", "register_module", "spec_matrix", "supported_layers", "verified"]
