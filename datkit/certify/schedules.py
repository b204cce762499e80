"""Perturbation-budget (eps) schedules of certified training, as a function of training progress in epochs.

``eps_t`` is 0 for the first ``start`` epochs, then ramps to ``eps_max`` over ``length`` epochs:

- ``linear``: ``eps_max * (t - start) / length`` (Gowal et al. 2018; Zhang et al. 2020);
- ``smoothed``: the schedule of DeepMind's IBP code, used by auto_LiRPA's ``SmoothedScheduler`` and by
  Shi et al. 2021: with ``s = (t - start) / length`` in [0, 1], ``eps_max * a * s**beta`` up to
  ``s = mid``, then linear to ``eps_max``, with ``a`` chosen so that value and slope are continuous at
  ``mid`` (``mid = 0.25``, ``beta = 4``). It grows slowly first, when the bounds are loosest.

``start`` counts epochs at eps = 0 *before* the ramp: the papers' ``start=2`` (1-based) is ``start=1``
here. Progress is fractional (epoch - 1 + step / steps_per_epoch), so eps grows every step.
"""
from __future__ import annotations

EPS_SCHEDULES = ("linear", "smoothed")
MID, BETA = 0.25, 4.0


def smoothed_fraction(s: float, mid: float = MID, beta: float = BETA) -> float:
    """The smoothed ramp at ``s`` in [0, 1] (0 at 0, 1 at 1, continuous slope at ``mid``)."""
    s = min(max(s, 0.0), 1.0)
    denom = (1.0 - mid) * beta + mid  # mid**(beta-1) * denom is the exponential part's normaliser
    if s < mid:
        return s ** beta / (mid ** (beta - 1.0) * denom)
    at_mid = mid / denom
    return at_mid + (1.0 - at_mid) * (s - mid) / (1.0 - mid)


def eps_schedule(name: str, eps_max: float, start: float, length: float, progress: float) -> float:
    """``eps_t`` after ``progress`` epochs of training (see the module docstring)."""
    if name not in EPS_SCHEDULES:
        raise ValueError(f"eps schedule must be one of {', '.join(EPS_SCHEDULES)}; got {name!r}")
    if progress < start:
        return 0.0
    if length <= 0:
        return eps_max
    s = min(1.0, (progress - start) / length)
    return eps_max * (s if name == "linear" else smoothed_fraction(s))
