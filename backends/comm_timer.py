"""Measures C, the seconds spent in gradient communication, as the union of communication intervals.

Collectives may run asynchronously and overlap each other (DDP buckets) and the backward pass; the
union of their [start, end] intervals is the wall time during which gradient communication was in
flight, which is what the DAT paper's column C reports (waiting for the slowest worker included).
"""
from __future__ import annotations

import threading
import time


class CommTimer:
    """Thread-safe collector of [start, end] intervals (``perf_counter`` seconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._intervals: list[tuple[float, float]] = []

    def record(self, start: float, end: float | None = None) -> None:
        """Add one interval; ``end`` defaults to now."""
        with self._lock:
            self._intervals.append((start, time.perf_counter() if end is None else end))

    def total(self) -> float:
        """Length of the union of the recorded intervals."""
        with self._lock:
            spans = sorted(self._intervals)
        total, cur_s, cur_e = 0.0, None, None
        for s, e in spans:
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    total += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            total += cur_e - cur_s
        return total

    def reset(self) -> float:
        """Return ``total()`` and forget all intervals."""
        t = self.total()
        with self._lock:
            self._intervals.clear()
        return t
