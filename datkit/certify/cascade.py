"""The verification cascade of evaluation (config ``bounds.verify``) and its metric, the verified accuracy VA.

``bounds.verify`` is a list of stages, cheapest first, e.g. ``[ibp, crown-ibp, crown]``: IBP (Gowal et al.
2018), CROWN-IBP (Zhang et al., ICLR 2020), full CROWN (Zhang et al. 2018, :mod:`.bounds.crown`). An example is
verified when every margin ``f_y - f_j`` has a positive lower bound over ``{x' : |x'-x|_inf <= eps} ∩ [0,1]^d``.
Clean-misclassified examples are dropped first (no bound can verify them: ``x`` is in the box); each stage then
bounds only the examples that the stages before it left unverified, so the set verified is the union of what
each stage verifies on its own, at the price of the cheap stages on most examples. Legacy string values:
``ibp`` = ``[ibp]``, ``crown-ibp`` = ``[ibp, crown-ibp]``, ``crown`` = ``[ibp, crown-ibp, crown]``.

Columns (:class:`VerifiedAccuracy`, reduced over workers with evaluation's all_reduce): ``VA`` / ``VE``, per stage
``VA_gain_<stage>`` (the fraction of all evaluated examples that stage verified; they sum to VA) and
``VA_time_<stage>_s`` (its seconds, summed over workers), and ``VA_gap`` = RA - VA (robust to PGD but not
verified: what better bounds could still win) when RA is evaluated. Evaluation runs in eval mode; with
``bounds.engine=auto_lirpa`` only the ``ibp`` and ``crown-ibp`` stages are available.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

STAGES = ("ibp", "crown-ibp", "crown")
EXPENSIVE = ("crown",)  # seconds per example (full CROWN): the falsifier runs before these
LEGACY = {"ibp": ("ibp",), "crown-ibp": ("ibp", "crown-ibp"), "crown": STAGES}
LIRPA_STAGES = ("ibp", "crown-ibp")


def stages_of(value: str | Sequence[str]) -> tuple[str, ...]:
    """The stages of a ``bounds.verify`` value: a list as given, a legacy string by :data:`LEGACY`."""
    if isinstance(value, str):
        return LEGACY.get(value, (value,))
    return tuple(str(v) for v in value)


def verify_errors(value: Any, engine: str = "native") -> list[str]:
    """One line naming ``bounds.verify`` and the allowed values when ``value`` is not a valid cascade."""
    shown = list(value) if not isinstance(value, (str, int, float)) and value is not None else value
    if value is None or isinstance(value, (int, float)):
        stages: tuple = ()
    else:
        stages = stages_of(value)
    bad = [s for s in stages if s not in STAGES]
    if not stages or bad or len(set(stages)) != len(stages):
        why = f"unknown stage(s) {', '.join(map(repr, bad))}" if bad else "empty or repeated stages"
        return [f"bounds.verify={shown!r}: {why}; allowed: a list of distinct stages from {', '.join(STAGES)} "
                f"(e.g. [ibp, crown-ibp, crown]), or one of {', '.join(LEGACY)}"]
    if engine == "auto_lirpa" and any(s not in LIRPA_STAGES for s in stages):
        return [f"bounds.verify={shown!r}: bounds.engine=auto_lirpa runs the stages {', '.join(LIRPA_STAGES)} only "
                "(crown needs bounds.engine=native)"]
    return []


def stage_verified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, stage: str, engine: str = "native",
                   num_classes: int | None = None) -> torch.Tensor:
    """Boolean ``(B,)``: the examples that ``stage``'s bound alone verifies."""
    from .bounds import crown_bounds, margin_bounds, num_classes_of, spec_matrix

    if engine != "native":
        if stage not in LIRPA_STAGES:
            raise ValueError(verify_errors([stage], engine)[0])
        from .bounds.engines import certified_margins

        return (certified_margins(engine, model, x, y, eps, stage, beta=1.0, num_classes=num_classes).lower > 0).all(1)
    if stage == "crown":
        C = spec_matrix(y, num_classes or num_classes_of(model)).to(x.dtype)
        lower = crown_bounds(model, x, eps, C, upper=False)[0]
    elif stage in ("ibp", "crown-ibp"):
        lower = margin_bounds(model, x, y, eps, stage, beta=1.0, num_classes=num_classes).lower
    else:
        raise ValueError(verify_errors([stage])[0])
    return (lower > 0).all(1)


@dataclass
class CascadeResult:
    """Which examples were verified, which stage verified each (``stage``: index, -1 = none), how many examples
    each stage received and its seconds."""

    verified: torch.Tensor
    stage: torch.Tensor
    received: list[int]
    seconds: list[float]


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def run_cascade(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, stages: Sequence[str],
                engine: str = "native", num_classes: int | None = None, falsifier: Any = None) -> CascadeResult:
    """The cascade on one batch (see the module docstring). ``falsifier`` (an attack, e.g. a deterministic PGD) runs
    once before the first :data:`EXPENSIVE` stage: an example it misclassifies has an adversarial example in the box,
    so no sound bound verifies it, and the expensive stage skips it (VA is the same with or without it)."""
    which = torch.full((len(y),), -1, dtype=torch.long, device=y.device)
    left = (model(x).argmax(1) == y).nonzero().squeeze(1)  # clean-misclassified ones cannot be verified
    received, seconds = [], []
    for k, stage in enumerate(stages):
        if stage in EXPENSIVE and falsifier is not None and len(left):
            robust = model(falsifier(model, x[left], y[left])).argmax(1) == y[left]
            left, falsifier = left[robust], None
        received.append(len(left))
        t0 = _clock(x.device)
        if len(left):
            ok = stage_verified(model, x[left], y[left], eps, stage, engine, num_classes)
            which[left[ok]] = k
            left = left[~ok]
        seconds.append(_clock(x.device) - t0)
    return CascadeResult(which >= 0, which, received, seconds)


def pgd_falsifier(eval_cfg: Any, eps: float) -> Any:
    """The falsifier of :func:`run_cascade`: the RA attack's settings (``eval.pgd_steps``, ``eval.pgd_alpha`` or
    ``2.5 * eps / steps``) without a random start, so every worker count breaks the same images."""
    from datkit.attacks import PGD

    alpha = eval_cfg.pgd_alpha if eval_cfg.pgd_alpha is not None else 2.5 * eps / eval_cfg.pgd_steps
    return PGD(eps=eps, alpha=max(alpha, 1e-12), steps=eval_cfg.pgd_steps, random_start=False, eval_mode=True)


class VerifiedAccuracy:
    """Evaluation column VA (and its complement VE) by the cascade ``method`` (a list of stages or a legacy string,
    see the module docstring), with the per-stage columns of the Metric protocol's optional ``columns``."""

    complement = "VE"

    def __init__(self, eps: float, method: str | Sequence[str] = "ibp", engine: str = "native",
                 num_classes: int | None = None, falsifier: Any = None) -> None:
        errors = verify_errors(method, engine)
        if errors:
            raise ValueError(errors[0])
        self.eps, self.method, self.engine, self.num_classes = eps, method, engine, num_classes
        self.falsifier = falsifier
        self.stages = stages_of(method)
        self.columns = tuple(f"VA_gain_{s}" for s in self.stages) + tuple(f"VA_time_{s}_s" for s in self.stages)

    def correct_columns(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[int, dict[str, float]]:
        """The number verified and, per stage, the number it verified and its seconds (sums over batches)."""
        res = run_cascade(model, x, y, self.eps, self.stages, self.engine, self.num_classes, self.falsifier)
        sums = {f"VA_gain_{s}": float((res.stage == k).sum()) for k, s in enumerate(self.stages)}
        sums.update({f"VA_time_{s}_s": t for s, t in zip(self.stages, res.seconds)})
        return int(res.verified.sum()), sums

    def correct(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
        return self.correct_columns(model, x, y)[0]

    def summarize(self, sums: dict[str, float], accuracy: float, record: dict[str, Any]) -> dict[str, float | None]:
        """Gains as fractions of the ``n`` evaluated examples, seconds as summed, and ``VA_gap`` = RA - VA."""
        n = max(1, int(record["n"]))
        out: dict[str, float | None] = {k: (v if k.endswith("_s") else v / n) for k, v in sums.items()}
        out["VA_gap"] = record["RA"] - accuracy if record.get("RA") is not None else None
        return out
