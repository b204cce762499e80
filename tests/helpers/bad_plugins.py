"""Plug-ins that are wrong in each way a user's can be: datkit must stop with exit code 2 and one line naming the key
(tests/test_examples.py). Imported from tests/ (``PYTHONPATH=tests``) as ``helpers.bad_plugins``."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def not_a_model(num_classes: int, in_channels: int, image_size: int) -> str:
    return "a string, not a module"


def not_a_pair() -> TensorDataset:
    return TensorDataset(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))


def _pair(x: torch.Tensor, y: torch.Tensor) -> tuple[TensorDataset, TensorDataset]:
    return TensorDataset(x, y), TensorDataset(x, y)


def wrong_shape() -> tuple[TensorDataset, TensorDataset]:
    """Images without a channel dimension (N x 8 x 8)."""
    return _pair(torch.rand(64, 8, 8), torch.arange(64) % 10)


def out_of_range() -> tuple[TensorDataset, TensorDataset]:
    """Pixel values 0..255 instead of [0, 1]."""
    return _pair(torch.rand(64, 1, 8, 8) * 255, torch.arange(64) % 10)


def not_a_method(cfg) -> object:
    return object()


def not_an_optimizer(params, lr: float, optim_cfg) -> list:
    return list(params)


class NotACompressor:
    options = ()
