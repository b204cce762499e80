"""Measures C, the seconds spent in gradient communication, as the union of communication intervals.

Collectives may run asynchronously and overlap each other (DDP buckets) and the backward pass; the
union of their [start, end] intervals is the wall time during which gradient communication was in
flight, which is what the DAT paper's column C reports (waiting for the slowest worker included).
One implementation, in ``datkit.compress.timing`` (the user-loop DDP hook times with it too).
"""
from __future__ import annotations

from datkit.compress.timing import CommIntervals as CommTimer

__all__ = ["CommTimer"]
