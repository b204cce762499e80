"""``datkit.fit``: the training of ``python -m datkit.train`` on a model object and dataset objects.

    import datkit
    final = datkit.fit(MyNet(), train_set, test_set, config="configs/mnist_pgd.yaml",
                       overrides=["train.epochs=5", "attack.eps=0.3"])
    print(final["TA"], final["RA"])

Works in a script started by ``python``, ``torchrun``, ``horovodrun`` or the ``deepspeed`` launcher: the backend is
the ``backend`` key (``auto``: recognised from the launcher). Writes the same files as the command line into
``train.output_dir`` (rank 0) and returns the same record as ``results.json``'s ``final`` on every worker.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from datkit.config import load_config


def _local_rank_from_argv(argv: Sequence[str]) -> None:
    """The deepspeed launcher appends ``--local_rank=N`` to the user's script: make it ``LOCAL_RANK`` if unset."""
    for i, a in enumerate(argv):
        if a.startswith(("--local_rank", "--local-rank")):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else None)
            if value is not None:
                os.environ.setdefault("LOCAL_RANK", value)


def fit(model: nn.Module, train_set: Dataset, test_set: Dataset, config: str | Mapping[str, Any] | None = None,
        overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train ``model`` (in place) on ``train_set``, evaluate on ``test_set``; returns the final results record.

    ``model``: any ``nn.Module`` taking inputs in [0, 1] (datkit adds ``Normalize(data.mean, data.std)`` in front,
    the identity unless they are set, as for ``model.name=MODULE:CALLABLE``). ``train_set`` / ``test_set``: map-style
    datasets of ``(x float tensor C x H x W in [0, 1], int label)``; channels, size and number of classes are
    inferred (a ``classes`` attribute wins). ``config``: a YAML path or a nested mapping; ``overrides``:
    ``key=value`` strings, as on the command line. ``model.*`` and ``data.name`` are not used (the objects are);
    ``data.mean`` / ``data.std`` / ``data.resize`` / ``data.num_labeled`` still apply.

    Same config, data and initial weights give the weights of ``python -m datkit.train`` with
    ``model.name=MODULE:CALLABLE`` and ``data.name=MODULE:CALLABLE`` (tested to 1e-6 under torchrun).
    A bad configuration raises ``datkit.config.ConfigError`` (one message naming the key) before anything trains.
    """
    from datkit.train import train

    _local_rank_from_argv(sys.argv[1:])
    cfg = load_config(config, overrides)
    return train(cfg, sys.argv[1:], model=model, train_set=train_set, test_set=test_set, exit_on_error=False)
