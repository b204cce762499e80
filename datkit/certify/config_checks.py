"""Checks of the ``smoothing.*`` and ``bounds.*`` sections, owned by the certification plug-ins (randomized
smoothing: ``method.name=smoothing`` and ``python -m datkit.certify``; bound propagation: ``ibp`` / ``crown-ibp``,
and the verification cascade ``bounds.verify``: ``datkit.certify.cascade``)."""
from __future__ import annotations

from datkit.config import at_least, choices

from .bounds.engines import ENGINES, require_engine
from .cascade import verify_errors
from .regularizers import TERMS
from .schedules import EPS_SCHEDULES


def smoothing_config_errors(cfg) -> list[str]:
    """Randomized smoothing: sigma > 0, 1 <= n0 <= n, alpha in (0, 1), radii >= 0 and increasing."""
    sm, errors = cfg.smoothing, []
    at_least(errors, "smoothing.sigma", sm.sigma, 0.0, strict=True)
    at_least(errors, "smoothing.num_noise", sm.num_noise, 1)
    at_least(errors, "smoothing.adv_steps", sm.adv_steps, 0)
    at_least(errors, "smoothing.adv_eps", sm.adv_eps, 0.0)
    at_least(errors, "smoothing.n0", sm.n0, 1)
    at_least(errors, "smoothing.n", sm.n, 1)
    if sm.n0 > sm.n:
        errors.append(f"smoothing.n0={sm.n0} must be <= smoothing.n={sm.n} (n0 noise samples select the class, "
                      f"n estimate its probability)")
    if not 0.0 < sm.alpha < 1.0:
        errors.append(f"smoothing.alpha={sm.alpha!r} must be in (0, 1) "
                      "(the certificate's failure probability, e.g. 0.001)")
    at_least(errors, "smoothing.batch_size", sm.batch_size, 1)
    at_least(errors, "smoothing.num_samples", sm.num_samples, 0)
    radii = list(sm.radii)
    if not radii or any(r < 0 for r in radii) or radii != sorted(radii):
        errors.append(f"smoothing.radii={radii!r} must be a non-empty increasing list of radii >= 0")
    return errors


def bounds_config_errors(cfg) -> list[str]:
    """Certified training (``bounds.*``): known engine / schedule / init / regularizers / verify bound; loss fusion
    (``bounds.loss_fusion``, CROWN-IBP) on the native engine only."""
    b, errors = cfg.bounds, []
    choices(errors, "bounds.engine", b.engine, ENGINES)
    choices(errors, "bounds.eps_schedule", b.eps_schedule, EPS_SCHEDULES)
    at_least(errors, "bounds.eps_start", b.eps_start, 0.0)
    at_least(errors, "bounds.eps_length", b.eps_length, 0.0)
    choices(errors, "bounds.init", b.init, ("ibp", "default"))
    at_least(errors, "bounds.reg_lambda", b.reg_lambda, 0.0)
    at_least(errors, "bounds.reg_tol", b.reg_tol, 0.0, strict=True)
    bad = [t for t in b.reg_terms if t not in TERMS]
    if bad:
        errors.append(f"bounds.reg_terms={list(b.reg_terms)!r}: unknown term(s) {', '.join(map(repr, bad))}; "
                      f"allowed: {', '.join(TERMS)}")
    if not 0.0 <= b.beta_final <= 1.0:
        errors.append(f"bounds.beta_final={b.beta_final!r} must be in [0, 1] (CROWN-IBP's weight after the ramp)")
    errors += verify_errors(b.verify, b.engine)
    if b.loss_fusion and b.engine == "auto_lirpa" and cfg.method.name == "crown-ibp":
        errors.append("bounds.loss_fusion=true is implemented by the native engine only: with bounds.engine=auto_lirpa "
                      "set bounds.loss_fusion=false (CROWN-IBP's margin form)")
    return errors


def certified_method_errors(cfg) -> list[str]:
    """What a bound-propagation method needs besides valid ``bounds.*``: l_inf balls and an importable engine."""
    errors = []
    if cfg.attack.norm != "linf":
        errors.append(f"attack.norm={cfg.attack.norm!r}: method {cfg.method.name} certifies l_inf balls only "
                      "(use linf)")
    if cfg.bounds.engine in ENGINES:
        try:
            require_engine(cfg.bounds.engine)
        except ImportError as err:
            errors.append(str(err))
    return errors
