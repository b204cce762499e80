"""Column C of the DAT paper: the seconds spent in gradient communication, as the union of communication intervals.

Collectives may run asynchronously and overlap each other (DDP buckets) and the backward pass; the union of their
[start, end] intervals is the wall time during which gradient communication was in flight (waiting for the
slowest worker included). Used by every backend (``datkit.backends.CommTimer``) and by the user-loop DDP hook.
"""
from __future__ import annotations

import threading
import time
from typing import Protocol


class IntervalRecorder(Protocol):
    """Where the hook records each bucket's [start, completion] interval (``perf_counter`` seconds)."""

    def record(self, start: float, end: float | None = None) -> None: ...


class CommIntervals:
    """Thread-safe union of [start, end] intervals: the wall time during which gradient communication was in
    flight (buckets overlap each other and the backward pass), as datkit's column C counts it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._intervals: list[tuple[float, float]] = []

    def record(self, start: float, end: float | None = None) -> None:
        """Add one interval; ``end`` defaults to now."""
        with self._lock:
            self._intervals.append((start, time.perf_counter() if end is None else end))

    def total(self) -> float:
        """Length of the union of the recorded intervals, in seconds."""
        with self._lock:
            spans = sorted(self._intervals)
        total, cur_s, cur_e = 0.0, 0.0, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                total += 0.0 if cur_e is None else cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        return total + (0.0 if cur_e is None else cur_e - cur_s)

    def reset(self) -> float:
        """Return ``total()`` and forget all intervals."""
        t = self.total()
        with self._lock:
            self._intervals.clear()
        return t
