"""The official MNIST test set (10,000 images) read from ``<shared_root>/MNIST/raw/t10k-*-idx*-ubyte.gz``.

The files are read in place (torchvision's MNIST class wants them unpacked); never copied into the
repository. Used for evaluation only.
"""
from __future__ import annotations

import gzip
import os

import numpy as np
import torch
from torch.utils.data import TensorDataset

IMAGES = "t10k-images-idx3-ubyte.gz"
LABELS = "t10k-labels-idx1-ubyte.gz"


def official_mnist_dir(shared_root: str) -> str:
    """``<shared_root>/MNIST/raw``."""
    return os.path.join(shared_root, "MNIST", "raw")


def official_mnist_available(shared_root: str) -> bool:
    """True when both test files exist under ``shared_root``."""
    d = official_mnist_dir(shared_root)
    return all(os.path.isfile(os.path.join(d, f)) for f in (IMAGES, LABELS))


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_official_mnist_test(shared_root: str) -> TensorDataset:
    """The 10k official test images as float tensors in [0, 1], shape (N, 1, 28, 28)."""
    d = official_mnist_dir(shared_root)
    if not official_mnist_available(shared_root):
        raise FileNotFoundError(f"official MNIST test set not found: expected {IMAGES} and {LABELS} in {d}")
    x = torch.from_numpy(_read_idx(os.path.join(d, IMAGES)).astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(_read_idx(os.path.join(d, LABELS)).astype(np.int64))
    return TensorDataset(x, y)
