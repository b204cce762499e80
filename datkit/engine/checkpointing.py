"""A training run's checkpoints: when they are due, what run state they hold, and restoring a resumed run from one.

``TrainingCheckpoints`` is the part of the :class:`~datkit.engine.trainer.Trainer` that talks to the backend's
checkpoint IO (``backend.save_training_state`` / ``backend.load_training_state``: the backend saves the model and
optimizer its own way) and puts the run state next to them: the epoch, the scheduler, the per-epoch records, the
config, the compression and optimizer-exchange states, the non-finite skip count and, for a mid-epoch checkpoint
(``train.checkpoint_every_steps``, or the one written when SIGUSR1/SIGTERM stops the run), the epoch's partial
state (``datkit.engine.epoch_state``). A file to resume from is untrusted input: every problem with it is a
one-line ``CheckpointError`` (``datkit.checkpoint``; exit code 2).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from datkit.config import CHECKPOINT

from .epoch_state import EpochProgress, epoch_progress, gather_ranks


@dataclass
class Resumed:
    """What a resumed run takes from its checkpoint besides the model, optimizer, scheduler and compression states."""

    records: list[dict[str, Any]]  # the per-epoch records so far
    start_epoch: int  # the first epoch to train
    progress: EpochProgress | None  # a mid-epoch checkpoint's partial epoch (None: an epoch-end checkpoint)
    nonfinite_consecutive: int  # steps skipped for a NaN/Inf in a row when it was written


class TrainingCheckpoints:
    """The checkpoint of a run in ``cfg.train.output_dir`` (``CHECKPOINT``): ``due_after_step`` /
    ``due_after_epoch`` say when one is written, ``save`` writes one (collective), ``restore`` reads one back."""

    def __init__(self, cfg: Any, backend: Any, model: Any, optimizer: Any, scheduler: Any,
                 steps_per_epoch: int) -> None:
        self.cfg, self.backend, self.model, self.optimizer, self.scheduler = cfg, backend, model, optimizer, scheduler
        self.steps_per_epoch = steps_per_epoch
        self.path = os.path.join(cfg.train.output_dir, CHECKPOINT)

    def due_after_step(self, epoch: int, step: int) -> bool:
        """``train.checkpoint_every_steps``: after every N-th optimizer step of the run (counted from its start), but
        not after an epoch's last step when the epoch's own checkpoint follows."""
        n = self.cfg.train.checkpoint_every_steps
        if n <= 0 or ((epoch - 1) * self.steps_per_epoch + step + 1) % n:
            return False
        return step + 1 < self.steps_per_epoch or not self.due_after_epoch(epoch)

    def due_after_epoch(self, epoch: int) -> bool:
        """``train.checkpoint_every`` epochs, and the last epoch."""
        every = self.cfg.train.checkpoint_every
        return bool(every and epoch % every == 0) or epoch == self.cfg.train.epochs

    def save(self, epoch: int, records: list[dict[str, Any]], nonfinite_consecutive: int,
             progress: EpochProgress | None = None) -> None:
        """Collective: checkpoint after ``epoch`` complete epochs -- and, with ``progress``, the first
        ``progress.next_step`` steps of epoch ``epoch + 1`` (a mid-epoch checkpoint, every rank's RNG state added):
        the backend saves model and optimizer its way, with this run state."""
        run_state = {"epoch": epoch, "scheduler": self.scheduler.state_dict(), "records": records,
                     "config": OmegaConf.to_yaml(self.cfg, resolve=True), "world_size": self.backend.world_size,
                     "compression": self.backend.compression_state(),
                     "optimizer_exchange": self.backend.optimizer_exchange_state(),
                     "nonfinite_consecutive": nonfinite_consecutive}
        if progress is not None:
            progress.ranks = gather_ranks(self.backend, progress.loss_sum)
            run_state["mid_epoch"] = progress.to_state()
        self.backend.save_training_state(self.path, self.model, self.optimizer, run_state)

    def restore(self, path: str) -> Resumed:
        """Restore a resumed run from ``path``: model, optimizer, scheduler, compression and optimizer-exchange states
        in place, the rest returned. The file is untrusted input: every problem with it (a pickle payload, a damaged
        or foreign file, another model or backend) is a one-line ``CheckpointError`` (``datkit.checkpoint``; exit
        code 2), raised by the backend's loader or here."""
        from datkit.checkpoint import RESUME_KEY, CheckpointError

        state = self.backend.load_training_state(path, self.model, self.optimizer)
        own, saved = sorted(self.scheduler.state_dict()), sorted(state["scheduler"])
        if own != saved:  # LR schedulers set every saved key as an attribute: only their own keys are taken
            raise CheckpointError(RESUME_KEY, path, f"its 'scheduler' state has the keys {saved[:8]}, this run's "
                                  f"schedule {own[:8]} (another schedule.name?)", shown=f"true ({path})")
        for what, restore, saved in (("scheduler", self.scheduler.load_state_dict, state["scheduler"]),
                                     ("compression", self.backend.load_compression_state, state.get("compression")),
                                     ("optimizer_exchange", self.backend.load_optimizer_exchange_state,
                                      state.get("optimizer_exchange"))):
            try:
                restore(saved)
            except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError) as err:
                raise CheckpointError(RESUME_KEY, path, f"its '{what}' state does not fit this run "
                                      f"({type(err).__name__}: {str(err)[:200]})", shown=f"true ({path})") from None
        try:
            progress = epoch_progress(state.get("mid_epoch"))  # None: an epoch-end checkpoint (or an older file)
        except ValueError as err:
            raise CheckpointError(RESUME_KEY, path, f"not a training checkpoint: {err}",
                                  shown=f"true ({path})") from None
        if progress is not None and progress.epoch != int(state["epoch"]) + 1:
            raise CheckpointError(RESUME_KEY, path, f"not a training checkpoint: 'mid_epoch.epoch' is {progress.epoch} "
                                  f"after {state['epoch']} complete epochs", shown=f"true ({path})")
        consecutive, start_epoch = int(state.get("nonfinite_consecutive", 0)), int(state["epoch"]) + 1
        if self.backend.is_main:
            where = (f"after epoch {state['epoch']}" if progress is None else
                     f"in epoch {progress.epoch} after step {progress.next_step - 1} (mid-epoch)")
            print(f"datkit: resumed from {path} {where}", flush=True)
        return Resumed(list(state["records"]), start_epoch, progress, consecutive)
