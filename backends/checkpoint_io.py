"""Checkpoint IO: how a backend writes and restores checkpoints, and which checkpoint format it writes.

``CheckpointIO`` is the format of the torch and Horovod backends ("torch": rank 0 writes one file holding the full
weights, the optimizer's state and the trainer's run state; every rank reads it). DeepSpeed's (ZeRO shards in a
folder next to the file) is ``deepspeed_checkpoint.DeepSpeedCheckpointIO``. Every format's file holds ``model`` (full
weights) and the run state's keys, so evaluation tools read every backend's checkpoints alike; a resumed run checks
that the file is of its own backend's format (``check_format``). The loads treat the file as untrusted input
(``datkit.checkpoint``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from datkit.checkpoint import (
    RESUME_KEY,
    CheckpointError,
    atomic_save,
    check_model_fits,
    load_checkpoint_file,
    load_datkit_checkpoint,
    load_optimizer_state,
)

from .collectives import Collectives

# format -> the backends that write it (the hint of a refused resume)
WRITERS = {"torch": "backend=torch or backend=horovod", "deepspeed": "backend=deepspeed"}


def written_by(state: dict[str, Any]) -> str:
    """Which format a checkpoint's training state is in: ``deepspeed`` (ZeRO shards in a folder next to it) or
    ``torch`` (the optimizer's state inside the file; the torch and horovod backends share this format)."""
    return "deepspeed" if "deepspeed_tag" in state or "deepspeed_dir" in state else "torch"


def resume_error(path: str, cause: str) -> CheckpointError:
    """The one-line error of a resumed run's checkpoint ``path`` (``train.resume=true (<path>): <cause>``)."""
    return CheckpointError(RESUME_KEY, path, cause, shown=f"true ({path})")


class CheckpointIO:
    """The "torch" checkpoint format: one file, written atomically by rank 0 (see module docstring)."""

    format = "torch"

    def __init__(self, collectives: Collectives) -> None:
        self.collectives = collectives

    def save_checkpoint(self, path: str, state: dict[str, Any]) -> None:
        """Rank 0 writes ``state`` atomically; every rank waits until it is on disk."""
        if self.collectives.rank == 0:
            atomic_save(state, path)
        self.collectives.barrier()

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Every rank loads ``path`` (``weights_only=True``) onto the CPU."""
        return load_checkpoint_file(path)

    def model_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The full (unsharded) weights of the plain model ``module``; collective on formats that shard parameters."""
        return module.state_dict()

    def check_format(self, state: dict[str, Any], backend: str, path: str) -> None:
        """A resumed run's checkpoint must hold training state in this format (``backend``: this run's, for the
        message)."""
        kind = written_by(state)
        if kind != self.format:
            raise resume_error(path, f"a checkpoint of another backend: written by the {kind} backend, this run uses "
                                     f"backend={backend} (resume it with {WRITERS[kind]}, or start a new "
                                     "train.output_dir)")
        if kind == "torch" and not isinstance(state.get("optimizer"), dict):
            raise resume_error(path, "not a training checkpoint: no 'optimizer' state")

    def load_checked(self, path: str, backend: str, module: nn.Module) -> dict[str, Any]:
        """The training checkpoint at ``path``, checked (``datkit.checkpoint``: weights only, a datkit training
        checkpoint) to be in this format with weights that fit ``module``; not yet loaded into anything."""
        state = load_datkit_checkpoint(path, RESUME_KEY, training=True)
        self.check_format(state, backend, path)
        check_model_fits(state["model"], module, RESUME_KEY, path)
        return state

    def save_training_state(self, path: str, module: nn.Module, optimizer: torch.optim.Optimizer,
                            run_state: dict[str, Any]) -> None:
        """Collective: the full weights of ``module``, ``optimizer``'s state and ``run_state`` in the file ``path``."""
        state = {**run_state, "model": self.model_state_dict(module), "optimizer": optimizer.state_dict()}
        self.save_checkpoint(path, state)

    def load_training_state(self, path: str, backend: str, module: nn.Module,
                            optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore what ``save_training_state`` wrote into ``module`` and ``optimizer``; returns the run state.
        Any problem is a one-line ``CheckpointError`` (exit code 2)."""
        state = self.load_checked(path, backend, module)
        module.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"], RESUME_KEY, path)
        return state
