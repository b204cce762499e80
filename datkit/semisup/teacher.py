"""The clean teacher of semi-supervised AT and its pseudo-labels (Carmon et al., "Unlabeled Data Improves
Adversarial Robustness", NeurIPS 2019: robust self-training; DAT paper Table 3).

The teacher is trained by the same ``Trainer`` as every run (``datkit.engine.run.teacher_config``: method
``clean`` on the labeled examples), so it runs on every backend with every feature (DDP / ZeRO / Horovod,
compression, checkpoints, the non-finite check). This module loads a saved teacher and pseudo-labels:
``pseudo_label`` gives every worker the same labels: each predicts a contiguous shard and the shards are
``all_gather``-ed.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from datkit.config.errors import ConfigError
from datkit.data import iterate_batches


def load_teacher(path: str, model: nn.Module, key: str = "semisup.teacher") -> None:
    """Load the datkit checkpoint ``path`` into ``model`` (built like the run's model); a one-line
    ``CheckpointError`` naming ``key`` when the file is unusable or its weights do not fit (which tensor)."""
    from datkit.checkpoint import check_model_fits
    from datkit.engine.transfer import read_checkpoint

    saved, saved_cfg = read_checkpoint(path, key)
    m = saved_cfg.get("model", {}) or {}
    check_model_fits(saved, model, key, path, f"this run's model and data (the teacher is built like model.*; "
                                              f"the checkpoint's model is {m.get('name', '?')} with kwargs "
                                              f"{m.get('kwargs', {})})")
    try:
        model.load_state_dict(saved)
    except RuntimeError as err:
        raise ConfigError(f"{key}={path}: the checkpoint's model {m.get('name', '?')} (kwargs {m.get('kwargs', {})}) "
                          f"does not fit this run's model and data (the teacher is built like model.*): "
                          f"{' '.join(str(err).split())[:400]}") from None


@torch.no_grad()
def pseudo_label(backend, model: nn.Module, dataset: Dataset, batch_size: int) -> torch.Tensor:
    """``argmax`` of ``model`` on every example of ``dataset`` (eval mode), identical on every worker (CPU int64)."""
    n, m = len(dataset), backend.world_size  # type: ignore[arg-type]
    chunk = math.ceil(n / m)
    mine = list(range(backend.rank * chunk, min(n, (backend.rank + 1) * chunk)))
    was_training = model.training
    model.eval()
    out = torch.full((chunk,), -1, dtype=torch.long)
    local_bs = max(1, batch_size // m)
    batches = [mine[i : i + local_bs] for i in range(0, len(mine), local_bs)]
    k = 0
    for x, _ in iterate_batches(dataset, batches):
        pred = model(x.to(backend.device)).argmax(1).cpu()
        out[k : k + len(pred)] = pred
        k += len(pred)
    model.train(was_training)
    return backend.all_gather(out.to(backend.device)).cpu().reshape(-1)[:n]


def teacher_state(model: nn.Module, cfg, records: list[dict[str, Any]]) -> dict[str, Any]:
    """A datkit checkpoint of the teacher (loadable as ``semisup.teacher=<path>`` or ``train.init_from``)."""
    return {"epoch": len(records), "model": model.state_dict(), "records": records,
            "config": OmegaConf.to_yaml(cfg, resolve=True), "teacher": True}
