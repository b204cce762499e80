"""``data.num_labeled``: keep the labels of a class-balanced, seeded part of the training set; the rest is the
unlabeled set of semi-supervised training (``datkit.semisup``; Carmon et al. 2019, "Unlabeled Data Improves
Adversarial Robustness"). The unlabeled part keeps its true labels only so that the accuracy of the
pseudo-labels can be reported; training never reads them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from datkit.config.errors import ConfigError


def dataset_labels(ds: Dataset) -> torch.Tensor:
    """The labels of ``ds`` as a 1-D int64 tensor (in-memory tensors, ``Subset``, ``.targets``, or by iterating)."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].long()
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[torch.as_tensor(ds.indices, dtype=torch.long)]
    targets = getattr(ds, "targets", None)
    if targets is not None:
        return torch.as_tensor(np.asarray(targets), dtype=torch.long)
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))], dtype=torch.long)  # type: ignore[arg-type]


def balanced_split(labels: torch.Tensor, num_labeled: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (labeled, unlabeled): ``num_labeled // C`` examples of each of the C classes (the first
    ``num_labeled % C`` classes of a seeded class order get one more), each class's pick a seeded permutation."""
    y = labels.numpy()
    classes = np.unique(y)
    if not 0 < num_labeled < len(y):
        raise ConfigError(f"data.num_labeled={num_labeled} must be between 1 and {len(y) - 1} "
                          f"(the training set has {len(y)} examples; 0 = all labeled)")
    rng = np.random.default_rng(seed)
    quota = np.full(len(classes), num_labeled // len(classes))
    quota[rng.permutation(len(classes))[: num_labeled % len(classes)]] += 1
    labeled = []
    for c, q in zip(classes, quota):
        idx = np.flatnonzero(y == c)
        if q > len(idx):
            raise ConfigError(f"data.num_labeled={num_labeled}: class {c} has only {len(idx)} training examples, "
                              f"{q} are needed for a class-balanced labeled set")
        labeled.append(idx[rng.permutation(len(idx))[:q]])
    lab = np.sort(np.concatenate(labeled))
    unlab = np.setdiff1d(np.arange(len(y)), lab)
    return lab, unlab


def split_labeled(ds: Dataset, num_labeled: int, seed: int = 0) -> tuple[Subset, Subset]:
    """(labeled, unlabeled) subsets of ``ds`` (see ``balanced_split``)."""
    lab, unlab = balanced_split(dataset_labels(ds), num_labeled, seed)
    return Subset(ds, lab.tolist()), Subset(ds, unlab.tolist())
