"""Checkpointing compressor state: every worker's residuals are gathered to rank 0 and handed back.

Error-feedback residuals differ per worker, and rank 0 alone writes checkpoints, so ``gather_state``
collects each worker's tensors (one ``all_gather`` per tensor, keys in sorted order on every rank) into
``{"world_size": M, "ranks": [state_0, ..., state_{M-1}]}``; ``pick_state`` gives each rank its own
entry back on resume. A checkpoint from a different world size restarts the residuals at zero.
"""
from __future__ import annotations

from typing import Any

import torch


def _gather_tensor(t: torch.Tensor, coll) -> list[torch.Tensor]:
    return [row.clone().cpu() for row in coll.all_gather(t)]


def gather_state(local: dict[str, Any], coll) -> dict[str, Any]:
    """Collective: all workers' ``local_state()`` (same keys on every worker) -> one dict (CPU tensors)."""
    m = coll.world_size
    ranks: list[dict[str, Any]] = [{"worker": {}, "server": {}, "generator": None} for _ in range(m)]
    for side in ("worker", "server"):
        for key in sorted(local[side]):
            for r, t in enumerate(_gather_tensor(local[side][key], coll)):
                ranks[r][side][key] = t
    if local.get("generator") is not None:
        for r, t in enumerate(_gather_tensor(local["generator"], coll)):
            ranks[r]["generator"] = t
    return {"world_size": m, "ranks": ranks}


def pick_state(saved: dict[str, Any] | None, rank: int, world_size: int, device: torch.device) -> dict[str, Any] | None:
    """This rank's entry of a ``gather_state`` dict, moved to ``device``; None if it does not fit."""
    if not saved or int(saved.get("world_size", -1)) != world_size:
        return None
    mine = saved["ranks"][rank]
    return {"worker": {k: v.to(device) for k, v in mine["worker"].items()},
            "server": {k: v.to(device) for k, v in mine["server"].items()},
            "generator": mine.get("generator")}
