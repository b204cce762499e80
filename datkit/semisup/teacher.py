"""The clean teacher of semi-supervised AT and its pseudo-labels (Carmon et al., "Unlabeled Data Improves
Adversarial Robustness", NeurIPS 2019: robust self-training; DAT paper Table 3).

``train_teacher`` trains the run's model architecture with plain cross-entropy on the labeled examples,
data-parallel over the backend's workers: each worker takes its slice of every global batch (the same
sampler as the main run) and the gradients are averaged with ``backend.all_reduce`` on one flat tensor, so
every worker ends with the same teacher on any backend (no DDP wrapper, no compression: the teacher's
training is a short prelude). ``pseudo_label`` gives every worker the same labels: each predicts a
contiguous shard and the shards are ``all_gather``-ed.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from datkit.config.errors import ConfigError
from datkit.data import ShardedBatchSampler, iterate_batches, random_shift
from datkit.optim import build_optimizer, build_scheduler


def _average_gradients(backend, params: list[nn.Parameter]) -> None:
    """Mean of every worker's gradients, in place (one flat all_reduce)."""
    if backend.world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = backend.all_reduce(torch.cat([g.reshape(-1) for g in grads]), op="mean")
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def train_teacher(cfg, backend, model: nn.Module, labeled: Dataset) -> list[dict[str, Any]]:
    """Train ``model`` (already on ``backend.device``) with clean cross-entropy on ``labeled`` for
    ``semisup.teacher_epochs`` epochs (``optim.*``, ``schedule.*``, global batch ``train.batch_size``,
    ``data.augment_shift``); returns one ``{epoch, train_loss}`` record per epoch."""
    g = cfg.train.batch_size
    try:
        sampler = ShardedBatchSampler(len(labeled), g, backend.rank, backend.world_size, seed=cfg.train.seed)
    except ValueError as err:
        raise ConfigError(f"semisup.teacher=train: {err} (lower train.batch_size or raise data.num_labeled)") from None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.optim, params, g)
    epochs = cfg.semisup.teacher_epochs
    scheduler = build_scheduler(cfg.schedule, optimizer, len(sampler), epochs)
    model.train()
    records = []
    bar = tqdm(total=len(sampler) * epochs, desc="teacher", leave=False, dynamic_ncols=True,
               disable=not (backend.is_main and cfg.log.progress))
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        total = torch.zeros(2, dtype=torch.float64)
        for x, y in iterate_batches(labeled, sampler, cfg.data.num_workers):
            x = random_shift(x, cfg.data.augment_shift).to(backend.device)
            loss = F.cross_entropy(model(x), y.to(backend.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(backend, params)
            optimizer.step()
            scheduler.step()
            total += torch.tensor([float(loss.detach()), 1.0], dtype=torch.float64)
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        total = backend.all_reduce(total.to(backend.device), op="sum").cpu()
        records.append({"epoch": epoch, "train_loss": float(total[0] / max(1.0, float(total[1])))})
    bar.close()
    return records


def load_teacher(path: str, model: nn.Module) -> None:
    """Load the datkit checkpoint ``path`` into ``model`` (built like the run's model); a ``ConfigError`` names
    the checkpoint's model when the weights do not fit."""
    from datkit.engine.transfer import read_checkpoint

    saved, saved_cfg = read_checkpoint(path, "semisup.teacher")
    try:
        model.load_state_dict(saved)
    except RuntimeError as err:
        m = saved_cfg.get("model", {}) or {}
        raise ConfigError(f"semisup.teacher={path!r}: the checkpoint's model {m.get('name', '?')} (kwargs "
                          f"{m.get('kwargs', {})}) does not fit this run's model and data (the teacher is built like "
                          f"model.*): {' '.join(str(err).split())[:400]}") from None


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
