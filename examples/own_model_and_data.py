"""Your own model and your own dataset, trained by datkit without touching datkit's source.

This file defines both; datkit takes them in either of two forms (the third, datkit's parts in your own
training loop, is ``examples/own_loop_ddp.py``).

1. By import path, from the command line (run from the repository root, or put this folder's parent on
   ``PYTHONPATH``); the launcher is switched by one key, ``backend`` (``auto`` recognises it)::

     ARGS="model.name=examples.own_model_and_data:make_model data.name=examples.own_model_and_data:make_data"
     torchrun --standalone --nproc_per_node 2 -m datkit.train $ARGS train.epochs=5
     horovodrun -np 2 -H localhost:2 --gloo python -m datkit.train $ARGS train.epochs=5
     deepspeed --num_gpus 2 datkit/train.py $ARGS train.epochs=5      # the launcher runs a script

2. Through the Python API, ``datkit.fit`` (same overrides, same launchers)::

     torchrun --standalone --nproc_per_node 2 examples/own_model_and_data.py train.epochs=5

The contract: a model factory ``make_model(num_classes=, in_channels=, image_size=, **model.kwargs)`` returning
an ``nn.Module`` that takes images in [0, 1]; a data function ``make_data(**data.kwargs)`` returning
``(train_set, test_set)``, map-style datasets of ``(x float tensor C x H x W in [0, 1], int label)``. datkit
infers channels, size and classes (here from ``classes``); normalization is none unless ``data.mean`` /
``data.std`` are set.
"""
from __future__ import annotations

import os
import sys

import torch
from sklearn.datasets import load_digits  # 1,797 8x8 handwritten digits, shipped with scikit-learn (offline)
from torch import nn
from torch.utils.data import Dataset


class Digits(Dataset):
    """scikit-learn's 8x8 digits as 1 x 8 x 8 float images in [0, 1] (pixel values 0..16 divided by 16)."""

    classes = [str(d) for d in range(10)]

    def __init__(self, indices: torch.Tensor) -> None:
        digits = load_digits()
        self.x = torch.tensor(digits.images, dtype=torch.float32)[indices].unsqueeze(1) / 16.0
        self.y = torch.tensor(digits.target, dtype=torch.long)[indices]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


def make_data(test_size: int = 297, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A seeded split of the digits: 1,500 for training, ``test_size`` held out (its own generator: no global RNG)."""
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(seed))
    return Digits(order[test_size:]), Digits(order[:test_size])


def make_model(num_classes: int, in_channels: int, image_size: int, width: int = 16) -> nn.Module:
    """A small CNN: two 3x3 convolutions (the second with stride 2), two linear layers."""
    side = (image_size + 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * width * side * side, 64), nn.ReLU(), nn.Linear(64, num_classes))


if __name__ == "__main__":
    import datkit
    from datkit.config import load_config

    overrides = [a for a in sys.argv[1:] if not a.startswith("--local")]  # the deepspeed launcher adds --local_rank
    # The same initial weights as the command line, which seeds with train.seed right before it builds the model
    torch.manual_seed(load_config(None, overrides).train.seed)
    train_set, test_set = make_data()
    model = make_model(num_classes=10, in_channels=1, image_size=8)
    final = datkit.fit(model, train_set, test_set, overrides=overrides)
    if os.environ.get("RANK", os.environ.get("HOROVOD_RANK", "0")) == "0":  # every worker gets the same record
        print(f"TA {final['TA']:.4f}  RA {final['RA']:.4f}  ({final['backend']}, {final['world_size']} workers)")
