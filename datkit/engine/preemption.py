"""Preemption: SIGUSR1 / SIGTERM stop every worker after the same step, with a mid-epoch checkpoint and exit code 75.

What a cluster sends before it takes the nodes back (Slurm: ``--signal=USR1@T`` before the time limit,
``scancel --signal=USR1``, SIGTERM on preemption or ``scancel``; torchrun's agent forwards SIGTERM) sets a flag in
the worker -- the handler does nothing else (async-signal-safe). At the end of every step the workers exchange
their flags in the step's existing collective (the non-finite guard's all-gather, one more float per worker; with
``train.nonfinite=ignore`` a 1-float all-gather of its own), so all of them stop after the same step even when only
one was signalled; rank 0 writes a mid-epoch ``checkpoint_last.pt``, prints (one line) ::

    datkit: got SIGUSR1 on rank R: checkpoint after epoch E step S written to PATH;
        exit 75 (requeue and resume with train.resume=true)

and every worker exits with ``EXIT_PREEMPTED`` = 75 (``EX_TEMPFAIL``). The same command with
``train.resume=true`` continues at step S+1 of epoch E and ends with the uninterrupted run's weights.

Exit codes of ``datkit.train`` (listed in ``datkit/__init__.py``): 0 done, 2 start-up error, 3 lost worker,
4 non-finite loss/gradient, 75 preempted. See docs/preemption.md for what each launcher does with the signals.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

# 75, EX_TEMPFAIL; defined in datkit/__init__.py beside the list of every exit code
from datkit import EXIT_PREEMPTED

__all__ = ["EXIT_PREEMPTED", "STOP_SIGNALS", "Preempted", "StopSignals", "signal_name", "who_got_what"]

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(SystemExit):
    """Training stopped on SIGUSR1/SIGTERM after a checkpoint was written; ``code`` is ``EXIT_PREEMPTED``.

    A ``SystemExit``, like the non-finite stop (code 4): the command line ends with it; a program calling
    ``datkit.train.train`` / ``datkit.fit`` may catch it and rerun with ``train.resume=true``."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_PREEMPTED)
        self.message = message


class StopSignals:
    """Within ``with StopSignals() as s:``, SIGUSR1 and SIGTERM only set ``s.signum`` (the first one received; 0 =
    none); the previous handlers are restored on exit. Outside the main thread (where Python cannot install
    handlers) it installs nothing and ``signum`` stays 0."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Callable[..., Any] | int | None] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:  # only sets a flag
        if not self.signum:
            self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def signal_name(signum: int) -> str:
    """``SIGUSR1`` for 10, ...; ``signal N`` for a number that names no signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def who_got_what(signums: list[int]) -> str:
    """``SIGUSR1 on rank 1`` / ``SIGTERM on ranks 0, 1`` from every rank's signal number (0 = none)."""
    by_signal: dict[int, list[int]] = {}
    for rank, s in enumerate(signums):
        if s:
            by_signal.setdefault(s, []).append(rank)
    return ", ".join(f"{signal_name(s)} on rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"
                     for s, r in by_signal.items())
