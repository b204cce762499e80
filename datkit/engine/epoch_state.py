"""What a mid-epoch checkpoint holds besides the model, optimizer, scheduler and compression states.

An epoch interrupted after step S resumes at step S+1 and finishes exactly as if it had not stopped: the sampler
starts at that step (the earlier batches are not read), and ``EpochProgress`` brings back the epoch's partial
accumulators -- loss sum and counted steps, T and C seconds, bytes sent, non-finite skips of the epoch and in a
row -- and, gathered to rank 0 and handed back to each rank, every rank's own loss sum and global RNG state (a
model's own dropout draws from it; it is re-seeded only at epoch starts). Everything else per step is keyed by
(seed, epoch, position)
(``datkit.randomness``) or lives in the optimizer / scheduler / compressor states the checkpoint has anyway.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

_NUMBERS = ("loss_sum", "T_s", "C_s", "bytes")
_COUNTS = ("epoch", "next_step", "steps", "nonfinite_skipped", "nonfinite_consecutive")


@dataclass
class EpochProgress:
    """The partial state of the epoch in progress (see module docstring); ``next_step``: the first step not trained."""

    epoch: int
    next_step: int = 0
    loss_sum: float = 0.0  # this rank's float64 sum of its step losses in the epoch's mean (skipped steps are not)
    steps: int = 0  # steps counted in that sum
    T_s: float = 0.0  # training seconds so far (checkpoint writes excluded)
    C_s: float = 0.0  # gradient communication seconds so far
    bytes: float = 0.0  # bytes of gradient communication sent so far
    nonfinite_skipped: int = 0  # steps skipped for a NaN/Inf in this epoch so far
    nonfinite_consecutive: int = 0  # skipped steps in a row, up to now (train.max_nonfinite_skips)
    ranks: dict[str, Any] | None = field(default=None)  # gather_ranks(): every rank's loss sum and RNG state

    def to_state(self) -> dict[str, Any]:
        """Plain values and tensors only (the checkpoint loads with ``weights_only=True``)."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: Any) -> EpochProgress:
        """Parse a checkpoint's ``mid_epoch`` entry; ``ValueError`` naming what is wrong."""
        if not isinstance(state, dict):
            raise ValueError(f"'mid_epoch' is a {type(state).__name__}, not a dict")
        for k in _COUNTS:
            v = state.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"'mid_epoch.{k}' is {v!r}, not a count")
        for k in _NUMBERS:
            if isinstance(state.get(k), bool) or not isinstance(state.get(k), (int, float)):
                raise ValueError(f"'mid_epoch.{k}' is {state.get(k)!r}, not a number")
        ranks = state.get("ranks")
        if ranks is not None and not (isinstance(ranks, dict) and isinstance(ranks.get("world_size"), int)
                                      and all(isinstance(ranks.get(k), list) and len(ranks[k]) == ranks["world_size"]
                                              for k in ("rng", "loss_sum"))
                                      and all(isinstance(t, torch.Tensor) for t in ranks["rng"])):
            raise ValueError("'mid_epoch.ranks' is not every rank's loss sum and RNG state")
        return cls(**{k: state[k] for k in (*_COUNTS, *_NUMBERS)}, ranks=ranks)


def gather_ranks(backend, loss_sum: float) -> dict[str, Any]:
    """Collective: every rank's loss sum and global torch RNG state (and the CUDA one on a CUDA device), for rank 0's
    checkpoint: ``{"world_size": M, "loss_sum": [rank 0's, ...], "rng": [...], "cuda_rng": [...] or None}``."""
    def gather(t: torch.Tensor) -> list[torch.Tensor]:
        return [row.clone().cpu() for row in backend.all_gather(t.to(backend.device))]

    cuda = gather(torch.cuda.get_rng_state(backend.device)) if backend.device.type == "cuda" else None
    sums = gather(torch.tensor([loss_sum], dtype=torch.float64))
    return {"world_size": backend.world_size, "loss_sum": [float(t[0]) for t in sums],
            "rng": gather(torch.get_rng_state()), "cuda_rng": cuda}


def restore_ranks(p: EpochProgress, backend) -> bool:
    """This rank's part of ``p.ranks``: its loss sum into ``p.loss_sum`` and its global RNG state. False when there is
    none or it is for another number of workers: then every rank takes the mean of the saved loss sums (the epoch's
    mean loss stays right) and the RNG is left as it is."""
    saved = p.ranks
    if not saved:
        return False
    if int(saved["world_size"]) != backend.world_size:
        p.loss_sum = sum(saved["loss_sum"]) / len(saved["loss_sum"])
        return False
    p.loss_sum = float(saved["loss_sum"][backend.rank])
    torch.set_rng_state(saved["rng"][backend.rank].to(torch.uint8).cpu())
    if saved.get("cuda_rng") is not None and backend.device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda_rng"][backend.rank].to(torch.uint8).cpu(), backend.device)
    return True


def epoch_progress(raw: Any) -> EpochProgress | None:
    """A checkpoint's ``mid_epoch`` entry parsed, or None for an epoch-end checkpoint (also one written before
    mid-epoch checkpoints existed)."""
    return None if raw is None else EpochProgress.from_state(raw)

