"""Build the training and evaluation data of a run from ``cfg.data`` (see ``datkit.config.schema``)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from datkit.config import ConfigError, raise_errors
from datkit.registry import is_import_path

from .checks import TEST_CHOICES as TEST_CHOICES
from .checks import data_config_errors
from .labeled import split_labeled
from .official_mnist import load_official_mnist_test, official_mnist_available
from .resize import resize_dataset, resized_spec
from .sampler import ShardedBatchSampler
from .spec import DATASETS, DatasetSpec
from .user import call_user_data, user_data_spec


@dataclass
class DataBundle:
    """The datasets of a run and what the model needs to know about them."""

    spec: DatasetSpec
    train: Dataset
    test: Dataset
    test_name: str  # e.g. "official MNIST test set (10000)" -- reported with the results
    unlabeled: Dataset | None = None  # data.num_labeled > 0: the training examples whose labels are not used


def _with_stats(spec: DatasetSpec, data_cfg) -> DatasetSpec:
    """``spec`` with ``data.mean`` / ``data.std`` when they are set."""
    if data_cfg.mean is None and data_cfg.std is None:
        return spec
    return replace(spec, mean=tuple(data_cfg.mean) if data_cfg.mean is not None else spec.mean,
                   std=tuple(data_cfg.std) if data_cfg.std is not None else spec.std)


def dataset_spec(data_cfg) -> DatasetSpec:
    """The registered spec of ``data_cfg.name`` with ``data.resize`` and ``data.mean`` / ``data.std`` applied (what
    models are built for). User data (``MODULE:CALLABLE``) has its spec inferred when it is built (``build_data``)."""
    return resized_spec(_with_stats(DATASETS.get(data_cfg.name), data_cfg), data_cfg.resize)


def resolve_test_set(data_cfg) -> str:
    """``mnist`` (the official test set) or ``split`` (the training set's held-out split, or user data's own
    test set)."""
    if is_import_path(data_cfg.name):
        return "split"
    spec = DATASETS.get(data_cfg.name)
    if data_cfg.test == "auto":
        return "mnist" if spec.mnist_like and official_mnist_available(data_cfg.shared_root) else "split"
    return data_cfg.test


def build_data(data_cfg, train_set: Dataset | None = None, test_set: Dataset | None = None) -> DataBundle:
    """The datasets of a run, resized to ``data_cfg.resize`` (0 = native) and, with ``data_cfg.num_labeled > 0``, split
    into labeled ``train`` and ``unlabeled`` (class-balanced, seed 0).

    The datasets are, in this order: ``train_set`` and ``test_set`` when given (``datkit.fit``); those returned by
    ``data.name=MODULE:CALLABLE`` called with ``data.kwargs``; the registered dataset ``data.name`` (``root``,
    ``download``, ``test``, ``shared_root``). User datasets are checked and their spec inferred (``datkit.data.user``).
    The config section is checked first (``data_config_errors``)."""
    if (train_set is None) != (test_set is None):
        raise ConfigError("give both train_set and test_set (map-style datasets of (x in [0, 1], int label)), "
                          "or neither")
    if train_set is None:
        raise_errors(data_config_errors(SimpleNamespace(data=data_cfg)))
    if train_set is not None or is_import_path(data_cfg.name):
        if train_set is not None:
            key, source = "train_set", type(train_set).__name__
            train, test = train_set, test_set
        else:
            key, source = "data.name", data_cfg.name
            train, test = call_user_data(key, source, OmegaConf.to_container(data_cfg.kwargs, resolve=True)
                                         if isinstance(data_cfg.kwargs, DictConfig) else dict(data_cfg.kwargs))
        spec = user_data_spec(key, source, train, test, data_cfg.mean, data_cfg.std)
        name = f"{source} test set ({len(test)})"
        spec = resized_spec(spec, data_cfg.resize)
    else:
        registered = DATASETS.get(data_cfg.name)
        test_kind = resolve_test_set(data_cfg)
        train, heldout = registered.build(root=data_cfg.root, download=data_cfg.download,
                                          use_all_for_training=test_kind == "mnist")
        if test_kind == "mnist":
            test = load_official_mnist_test(data_cfg.shared_root)
            name = f"official MNIST test set ({len(test)})"
        else:
            test, name = heldout, f"{registered.name} held-out split ({len(heldout)})"
        spec = dataset_spec(data_cfg)  # with data.mean / data.std and data.resize applied
    if data_cfg.resize > 0:
        train, test = resize_dataset(train, data_cfg.resize), resize_dataset(test, data_cfg.resize)
        name += f", resized to {data_cfg.resize}x{data_cfg.resize}"
    unlabeled = None
    if data_cfg.num_labeled > 0:
        train, unlabeled = split_labeled(train, data_cfg.num_labeled, seed=0)
    return DataBundle(spec, train, test, name, unlabeled)


def iterate_batches(dataset: Dataset, sampler: ShardedBatchSampler | Sequence[Sequence[int]],
                    num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y) for each index list of ``sampler``; in-memory tensors are indexed directly. A DataLoader's
    iterator is created by this call (it draws its workers' base seed from the global RNG then), so a caller can
    set the global RNG state after it (a mid-epoch resume) and the batches' own draws are those of the
    uninterrupted epoch."""
    if isinstance(dataset, TensorDataset):
        return _indexed(dataset.tensors, None, sampler)
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorDataset):
        return _indexed(dataset.dataset.tensors, torch.as_tensor(dataset.indices, dtype=torch.long), sampler)
    return iter(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, persistent_workers=False))


def _indexed(tensors: Sequence[torch.Tensor], base: torch.Tensor | None,
             sampler: Iterable[Sequence[int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x_all, y_all = tensors
    for idx in sampler:
        t = torch.as_tensor(idx, dtype=torch.long)
        if base is not None:
            t = base[t]
        yield x_all[t], y_all[t]


def eval_subset(n: int, num_samples: int, seed: int = 0) -> list[int]:
    """A fixed, seeded subset of ``num_samples`` test indices (all of them when 0 or >= n)."""
    if num_samples <= 0 or num_samples >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:num_samples].tolist())
