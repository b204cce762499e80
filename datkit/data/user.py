"""Your own datasets: ``data.name=MODULE:CALLABLE`` (called with ``data.kwargs``) or the datasets handed to
``datkit.fit`` / ``build_run``.

The contract is the least a PyTorch user already has: two map-style datasets, ``train_set`` and
``test_set``, whose items are ``(x, y)`` with ``x`` a float tensor ``C x H x W`` with values in [0, 1] and
``y`` an integer class label. datkit infers the rest:

- ``in_channels`` and ``image_size`` from the first training item (``image_size`` = H; datkit's own zoo
  models assume square images, torchvision / timm / your own models need not);
- ``num_classes`` from a ``classes`` attribute of the training set (its length) if there is one, else
  ``max(label) + 1`` over the training labels (a ``targets`` attribute is used when present);
- normalization: none (mean 0, std 1) unless ``data.mean`` / ``data.std`` are given.

A sample of items of both sets (the first, the last and a few seeded ones) is checked before anything
trains; a wrong shape, dtype, range or label raises ``ConfigError`` naming ``data.name`` and the item.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from datkit.config.errors import ConfigError
from datkit.registry import PluginError, load_object

from .labeled import dataset_labels
from .spec import DatasetSpec

SAMPLE = 8  # items checked per dataset besides the first and the last


def call_user_data(key: str, path: str, kwargs: dict[str, Any]) -> tuple[Dataset, Dataset]:
    """``(train_set, test_set)`` returned by the callable at ``path`` called with ``kwargs``."""
    try:
        fn = load_object(path)
    except PluginError as err:
        raise ConfigError(f"{key}={path!r}: {err}") from None
    if not callable(fn):
        raise ConfigError(f"{key}={path!r} is a {type(fn).__name__}, not a callable returning (train_set, test_set)")
    try:
        out = fn(**kwargs)
    except Exception as err:  # noqa: BLE001 -- the user's code: one line, no traceback
        raise ConfigError(f"{key}={path!r}: calling it with data.kwargs={kwargs!r} failed: "
                          f"{type(err).__name__}: {err}") from None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ConfigError(f"{key}={path!r} returned a {type(out).__name__}; expected a pair (train_set, test_set) of "
                          f"map-style datasets")
    return out[0], out[1]


def _check_item(key: str, source: str, which: str, ds: Dataset, i: int, shape: torch.Size | None) -> torch.Size:
    where = f"{key}={source!r}: {which} item {i}"
    try:
        item = ds[i]
    except Exception as err:  # noqa: BLE001 -- the user's code: one line, no traceback
        raise ConfigError(f"{where}: reading it failed: {type(err).__name__}: {err}") from None
    if not (isinstance(item, (tuple, list)) and len(item) >= 2):
        raise ConfigError(f"{where} is a {type(item).__name__}; expected (x, y): x a float tensor C x H x W in [0, 1], "
                          f"y an int label")
    x, y = item[0], item[1]
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 3):
        got = (f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor)
               else f"a {type(x).__name__}")
        raise ConfigError(f"{where}: x is {got}; expected a float tensor C x H x W with values in [0, 1] "
                          f"(e.g. torchvision's ToTensor())")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0 or x.isnan().any():
        raise ConfigError(f"{where}: x has values in [{lo:.4g}, {hi:.4g}]; expected [0, 1] (datkit normalizes "
                          f"inside the model: give data.mean / data.std instead of normalizing the data)")
    label_ok = (isinstance(y, int) and not isinstance(y, bool)) or (
        isinstance(y, torch.Tensor) and y.numel() == 1 and not y.is_floating_point() and not y.is_complex())
    if not label_ok:
        raise ConfigError(f"{where}: y is {y!r} ({type(y).__name__}); expected an int class label")
    if shape is not None and x.shape != shape:
        raise ConfigError(f"{where}: x has shape {tuple(x.shape)}, the first training item {tuple(shape)}; all images "
                          f"must have one shape (resize them, or set data.resize)")
    return x.shape


def _sample(n: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(0, n, (SAMPLE,), generator=g).tolist() if n > 2 else []
    return sorted({0, n - 1, *picks})


def _num_classes(key: str, source: str, train: Dataset) -> int:
    classes = getattr(train, "classes", None)
    labels = dataset_labels(train)
    if classes is not None:
        n = len(classes)
    else:
        n = int(labels.max()) + 1 if len(labels) else 0
    if n < 1 or int(labels.min()) < 0 or int(labels.max()) >= n:
        raise ConfigError(f"{key}={source!r}: the training labels span [{int(labels.min())}, {int(labels.max())}]; "
                          f"expected class indices 0 .. num_classes-1"
                          + (f" with num_classes={n} (len of .classes)" if classes else ""))
    return n


def user_data_spec(key: str, source: str, train: Dataset, test: Dataset, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> DatasetSpec:
    """Check a sample of ``train`` / ``test``'s items and infer the spec (channels, size, classes) of user data."""
    for which, ds in (("train_set", train), ("test_set", test)):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise ConfigError(f"{key}={source!r}: {which} is a {type(ds).__name__}; expected a map-style dataset "
                              f"(__len__ and __getitem__)")
        if len(ds) == 0:  # type: ignore[arg-type]
            raise ConfigError(f"{key}={source!r}: {which} is empty")
    shape = _check_item(key, source, "train_set", train, 0, None)
    for which, ds in (("train_set", train), ("test_set", test)):
        for i in _sample(len(ds)):  # type: ignore[arg-type]
            _check_item(key, source, which, ds, i, shape)
    channels, size = int(shape[0]), int(shape[1])
    m = tuple(float(v) for v in mean) if mean is not None else (0.0,)
    s = tuple(float(v) for v in std) if std is not None else (1.0,)
    for name, values in (("data.mean", m), ("data.std", s)):
        if len(values) not in (1, channels):
            raise ConfigError(f"{name}={list(values)!r} has {len(values)} values; "
                              f"the images have {channels} channel(s)")
    return DatasetSpec(name=source, num_classes=_num_classes(key, source, train), in_channels=channels, image_size=size,
                       mean=m, std=s, build=lambda **_: (train, test))
