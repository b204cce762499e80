"""The data plug-in's own config checks (``data.*``): run by ``datkit.preflight`` before any worker trains, and by
``build_data`` when the data is built."""
from __future__ import annotations

import os

from datkit.config import at_least, choices
from datkit.registry import PluginError, is_import_path, load_object

from .official_mnist import official_mnist_available
from .spec import DATASETS

TEST_CHOICES = ("auto", "split", "mnist")


def data_config_errors(cfg) -> list[str]:
    """Errors in ``cfg.data``: a registered dataset or an importable ``MODULE:CALLABLE``, the test-set choice, the
    official MNIST test set where it is asked for, and the numeric options."""
    d, errors = cfg.data, []
    choices(errors, "data.test", d.test, TEST_CHOICES)
    at_least(errors, "data.num_workers", d.num_workers, 0)
    at_least(errors, "data.augment_shift", d.augment_shift, 0)
    at_least(errors, "data.resize", d.resize, 0)
    at_least(errors, "data.num_labeled", d.num_labeled, 0)
    for key in ("mean", "std"):
        values = getattr(d, key)
        if values is not None and (len(values) == 0 or (key == "std" and any(v <= 0 for v in values))):
            errors.append(f"data.{key}={list(values)!r} must be a non-empty list of per-channel values"
                          + (" > 0" if key == "std" else ""))
    if is_import_path(d.name):
        try:
            if not callable(load_object(d.name)):
                errors.append(f"data.name={d.name!r} is not callable "
                              "(expected a function returning (train_set, test_set))")
        except PluginError as err:
            errors.append(f"data.name={d.name!r}: {err}")
        if d.test == "mnist":
            errors.append(f"data.test=mnist evaluates on the official MNIST test set; data.name={d.name!r} "
                          f"brings its own test set (use data.test=auto)")
        return errors
    if d.kwargs:
        errors.append(f"data.kwargs={dict(d.kwargs)!r} applies to data.name=MODULE:CALLABLE only "
                      f"(data.name={d.name!r})")
    if d.name not in DATASETS:
        errors.append(f"data.name={d.name!r} is not one of: {', '.join(DATASETS.names())} (or MODULE:CALLABLE)")
        return errors
    spec = DATASETS.get(d.name)
    if d.test == "mnist":
        if not spec.mnist_like:
            errors.append(f"data.test=mnist evaluates on the official MNIST test set and needs MNIST training data; "
                          f"data.name={d.name!r} is not (use data.test=auto or split)")
        elif not official_mnist_available(d.shared_root):
            errors.append(f"data.test=mnist: the official MNIST test set was not found in "
                          f"{os.path.join(d.shared_root, 'MNIST', 'raw')} (set data.shared_root, or data.test=split)")
    if spec.check is not None:
        try:
            spec.check(root=d.root, download=d.download)
        except FileNotFoundError as err:
            errors.append(str(err))
    return errors
