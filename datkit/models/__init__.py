"""Model zoo: a registry of factories and :func:`create_model`, which returns a model taking [0, 1] inputs.

Importing this package registers the built-in models (no weights are built at import time):
``cnn_small`` (datkit's default, a widened ``cnn_4layer``), ``cnn_4layer`` (Wong & Kolter 2018), ``cnn_madry``
(Madry et al. 2018), ``cnn_7layer_bn`` (Shi et al. 2021), ``preact_resnet18``
(He et al. 2016), ``wide_resnet`` (Zagoruyko & Komodakis 2016), ``resnet50`` (He et al. 2016), and the
certified-training models of Shi et al. 2021: ``wide_resnet_8``, ``resnext`` and the 64x64 TinyImageNet
variants ``cnn_7layer_bn_imagenet64``, ``wide_resnet_imagenet64``, ``resnext_imagenet64``.
"""
from __future__ import annotations

# Import for the side effect of registering each model with MODELS.
from datkit.models import cnn4, cnn7, preact_resnet, resnet50, resnext, small_cnn, wide_resnet, wide_resnet_bn  # noqa: F401
from datkit.models.normalize import Normalize, NormalizedModel
from datkit.models.registry import MODELS, create_model, list_models, model_config_errors, wrap_model

__all__ = ["MODELS", "Normalize", "NormalizedModel", "create_model", "list_models", "model_config_errors", "wrap_model"]
