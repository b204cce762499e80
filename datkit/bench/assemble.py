"""How every bench builds what it times: through ``datkit.engine.build_run``, the builder of every training run.

A bench needs no real data, so the run gets random ``[0, 1]`` images of the configured dataset's shape and
classes, and that dataset's normalization (``data.mean`` / ``data.std``), so the model is the one training builds.
"""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from datkit.data import dataset_spec
from datkit.engine import Run, build_run


class ShapedRandom(TensorDataset):
    """Uniform [0, 1] images with labels, and a ``classes`` attribute (datkit infers the number of classes from it)."""

    def __init__(self, n: int, channels: int, size: int, num_classes: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        super().__init__(torch.rand(n, channels, size, size, generator=g),
                         torch.randint(0, num_classes, (n,), generator=g))
        self.classes = list(range(num_classes))


def bench_run(cfg, backend, batches: int = 4) -> Run:
    """A run of ``cfg`` on ``backend`` over ``batches`` global batches of random data shaped like ``data.name``."""
    spec = dataset_spec(cfg.data)
    cfg.data.mean, cfg.data.std = list(spec.mean), list(spec.std)
    data = ShapedRandom(batches * cfg.train.batch_size, spec.in_channels, spec.image_size, spec.num_classes)
    return build_run(cfg, backend, train_set=data, test_set=data)
