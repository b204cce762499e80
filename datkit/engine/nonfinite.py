"""``train.nonfinite``: a NaN/Inf loss or gradient on any worker, decided by all workers at the same step.

After the backward pass(es) of a step and before gradient clipping and the optimizer step, every worker
contributes two flags (``Backend.nonfinite_gradients``): its own loss or its *local* gradients were
non-finite -- seen before compression or averaging, by the backend's gradient hooks, or in ``.grad`` where the
reduction waits for the optimizer step --, and the averaged gradients in ``.grad`` are. The local flag does
not depend on what a codec does with a NaN (int8's and onebit's block scale turn one NaN into a NaN block
on every worker, whose it was is lost; a codec without a scale could turn it into finite garbage). The
flags are exchanged with one tiny all-gather (2 floats per worker), so every worker takes the same
decision at the same step and names the ranks whose loss or local gradients were non-finite:

- ``stop`` (default): every worker prints ``datkit: non-finite loss/gradient at epoch E step S on
  rank(s) R; stopping (train.nonfinite=stop)`` and exits with code ``NONFINITE_EXIT`` = 4; the last
  complete checkpoint is left as it was;
- ``skip``: no optimizer step for that batch (gradients dropped, ``Backend.skip_step``); the lr schedule
  still advances, so epochs stay aligned with the uninterrupted schedule; the skipped steps are counted
  (``nonfinite_skipped`` per epoch and in ``final`` of results.json) and logged by rank 0; after
  ``train.max_nonfinite_skips`` consecutive skips the run stops as with ``stop``;
- ``ignore``: no check and no collective (a NaN then reaches the weights).

Steps are numbered from 0 within an epoch; epochs from 1.

The same all-gather carries a third float per worker, the stop signal it received (``datkit.engine.preemption``;
0 = none): ``stop_signals`` is then every rank's, the same on every worker, so all of them stop after the same
step. With ``ignore`` the signals alone are all-gathered (1 float per worker; nothing with one worker).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

NONFINITE_EXIT = 4


class NonFiniteGuard:
    """The per-step decision of ``train.nonfinite`` (see module docstring)."""

    def __init__(self, mode: str, max_skips: int, backend) -> None:
        self.mode, self.max_skips, self.backend = mode, int(max_skips), backend
        self.consecutive = 0
        self.skipped = 0  # in the current epoch (``take_epoch_count`` resets it)
        self.stop_signals: list[int] = []  # every rank's stop signal at the last check (0 = none)

    def check(self, loss: float, model: nn.Module, epoch: int, step: int, stop_signal: int = 0) -> bool:
        """Collective: True when this step must be skipped; exits (code 4) when the run must stop. ``stop_signal``:
        the signal this worker received (0 = none), shared as ``stop_signals`` (see module docstring)."""
        be = self.backend
        if self.mode == "ignore":
            self.stop_signals = self.share_stop_signal(stop_signal)
            return False
        local, averaged = be.nonfinite_gradients(model)
        local = local or not torch.isfinite(torch.tensor(loss)).item()
        flags = be.all_gather(torch.tensor([float(local), float(averaged), float(stop_signal)],
                                           device=be.device)).view(-1, 3).tolist()
        self.stop_signals = [int(s) for _, _, s in flags]
        ranks = [r for r, (f_local, _, _) in enumerate(flags) if f_local > 0]
        if not ranks and not any(f_avg > 0 for _, f_avg, _ in flags):
            self.consecutive = 0
            return False
        on = (f"on rank(s) {', '.join(map(str, ranks))}" if ranks else
              "in the averaged gradients (some rank's local gradient; the backend averaged it before the check)")
        where = f"non-finite loss/gradient at epoch {epoch} step {step} {on}"
        if self.mode == "stop":
            self._stop(f"{where}; stopping (train.nonfinite=stop)")
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_skips:
            self._stop(f"{where}; stopping after {self.consecutive} consecutive skipped steps "
                       f"(train.max_nonfinite_skips={self.max_skips})")
        if be.is_main:
            print(f"datkit: {where}; step skipped (train.nonfinite=skip, {self.consecutive} in a row, "
                  f"{self.skipped} this epoch)", file=sys.stderr, flush=True)
        return True

    def share_stop_signal(self, stop_signal: int) -> list[int]:
        """Collective (none with one worker): every rank's stop signal (0 = none), in one all-gather of a float."""
        be = self.backend
        if be.world_size == 1:
            return [int(stop_signal)]
        return [int(s) for s in be.all_gather(torch.tensor([float(stop_signal)], device=be.device)).view(-1).tolist()]

    def take_epoch_count(self) -> int:
        """Steps skipped since the last call (one epoch's count)."""
        n, self.skipped = self.skipped, 0
        return n

    def _stop(self, message: str) -> None:
        print(f"datkit: {message} [rank {self.backend.rank}]", file=sys.stderr, flush=True)
        raise SystemExit(NONFINITE_EXIT)
