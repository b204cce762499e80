"""What a dataset is to the rest of datkit: its shape, normalization and how to build its splits."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch.utils.data import Dataset

from ..registry import Registry


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset. ``build(cfg_data)`` returns ``(train, heldout)``; inputs in [0, 1].

    ``mean``/``std`` are the per-channel statistics the model normalizes with internally.
    ``mnist_like`` marks data whose held-out set may be replaced by the official MNIST test set.
    ``check`` (optional) raises ``FileNotFoundError`` naming what is missing, before training starts.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    build: Callable[..., tuple[Dataset, Dataset]]
    mnist_like: bool = False
    check: Callable[..., None] | None = None


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register ``spec`` under ``spec.name``."""
    DATASETS.register(spec.name)(spec)
    return spec
