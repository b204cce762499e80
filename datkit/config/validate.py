"""Value checks of a loaded config: every impossible value is reported at once, before training.

Each message names the key and what is allowed (``ConfigError``). ``validate_config`` needs no
process group; ``validate_for_world`` adds the checks that depend on the number of workers.
"""
from __future__ import annotations

import os

from .errors import ConfigError


def _choices(errors: list[str], key: str, value: object, allowed) -> None:
    allowed = list(allowed)
    if value not in allowed:
        errors.append(f"{key}={value!r} is not one of: {', '.join(map(str, allowed))}")


def _at_least(errors: list[str], key: str, value, minimum, strict: bool = False) -> None:
    if value is None:
        return
    if value < minimum or (strict and value == minimum):
        errors.append(f"{key}={value!r} must be {'>' if strict else '>='} {minimum}")


def _check_data(cfg, errors: list[str]) -> None:
    from datkit.data import DATASETS, TEST_CHOICES, official_mnist_available

    _choices(errors, "data.name", cfg.data.name, DATASETS.names())
    _choices(errors, "data.test", cfg.data.test, TEST_CHOICES)
    _at_least(errors, "data.num_workers", cfg.data.num_workers, 0)
    _at_least(errors, "data.augment_shift", cfg.data.augment_shift, 0)
    if cfg.data.name not in DATASETS:
        return
    spec = DATASETS.get(cfg.data.name)
    if cfg.data.test == "mnist":
        if not spec.mnist_like:
            errors.append(f"data.test=mnist evaluates on the official MNIST test set and needs MNIST training data; "
                          f"data.name={cfg.data.name!r} is not (use data.test=auto or split)")
        elif not official_mnist_available(cfg.data.shared_root):
            errors.append(f"data.test=mnist: the official MNIST test set was not found in "
                          f"{os.path.join(cfg.data.shared_root, 'MNIST', 'raw')} (set data.shared_root, or data.test=split)")
    if spec.check is not None:
        try:
            spec.check(root=cfg.data.root, download=cfg.data.download)
        except FileNotFoundError as err:
            errors.append(str(err))


def _check_compression(cfg, errors: list[str]) -> None:
    """compression.name is registered and every option set applies to it (built once to check)."""
    from datkit.compress import COMPRESSORS, compressor_from_config

    c = cfg.compression
    if c.name not in COMPRESSORS:
        _choices(errors, "compression.name", c.name, COMPRESSORS.names())
        return
    try:
        compressor_from_config(c)
    except ValueError as err:
        errors.append(f"compression: {err}")


def _check_faults(cfg, errors: list[str]) -> None:
    """Lost workers and non-finite steps: dist.peer_timeout_s 0 (off) or >= 1; train.nonfinite stop | skip | ignore."""
    if cfg.dist.peer_timeout_s != 0:
        _at_least(errors, "dist.peer_timeout_s", cfg.dist.peer_timeout_s, 1.0)
    _choices(errors, "train.nonfinite", cfg.train.nonfinite, ("stop", "skip", "ignore"))
    _at_least(errors, "train.max_nonfinite_skips", cfg.train.max_nonfinite_skips, 1)


def _check_deepspeed(cfg, errors: list[str]) -> None:
    """deepspeed.*: stage 0-3, offload devices and the stages they need, one precision at a time."""
    d = cfg.deepspeed
    _choices(errors, "deepspeed.zero_stage", d.zero_stage, (0, 1, 2, 3))
    _choices(errors, "deepspeed.offload_optimizer", d.offload_optimizer, ("none", "cpu"))
    _choices(errors, "deepspeed.offload_param", d.offload_param, ("none", "cpu"))
    if d.offload_optimizer != "none" and d.zero_stage < 1:
        errors.append("deepspeed.offload_optimizer=cpu needs deepspeed.zero_stage >= 1")
    if d.offload_param != "none" and d.zero_stage != 3:
        errors.append("deepspeed.offload_param=cpu needs deepspeed.zero_stage=3")
    if d.fp16 and d.bf16:
        errors.append("deepspeed.fp16 and deepspeed.bf16 are both true; choose one")


def _check_smoothing(cfg, errors: list[str]) -> None:
    """Randomized smoothing: sigma > 0, 1 <= n0 <= n, alpha in (0, 1), radii >= 0 and increasing."""
    sm = cfg.smoothing
    _at_least(errors, "smoothing.sigma", sm.sigma, 0.0, strict=True)
    _at_least(errors, "smoothing.num_noise", sm.num_noise, 1)
    _at_least(errors, "smoothing.adv_steps", sm.adv_steps, 0)
    _at_least(errors, "smoothing.adv_eps", sm.adv_eps, 0.0)
    _at_least(errors, "smoothing.n0", sm.n0, 1)
    _at_least(errors, "smoothing.n", sm.n, 1)
    if sm.n0 > sm.n:
        errors.append(f"smoothing.n0={sm.n0} must be <= smoothing.n={sm.n} (n0 noise samples select the class, "
                      f"n estimate its probability)")
    if not 0.0 < sm.alpha < 1.0:
        errors.append(f"smoothing.alpha={sm.alpha!r} must be in (0, 1) (the certificate's failure probability, e.g. 0.001)")
    _at_least(errors, "smoothing.batch_size", sm.batch_size, 1)
    _at_least(errors, "smoothing.num_samples", sm.num_samples, 0)
    radii = list(sm.radii)
    if not radii or any(r < 0 for r in radii) or radii != sorted(radii):
        errors.append(f"smoothing.radii={radii!r} must be a non-empty increasing list of radii >= 0")


def _check_bounds(cfg, errors: list[str]) -> None:
    """Certified training (bounds.*): known engine / schedule / init / regularizers / verify bound; the
    auto_lirpa engine must be importable when a certified method uses it."""
    from datkit.certify.bounds.engines import ENGINES, require_engine
    from datkit.certify.regularizers import TERMS
    from datkit.certify.schedules import SCHEDULES

    b = cfg.bounds
    _choices(errors, "bounds.engine", b.engine, ENGINES)
    _choices(errors, "bounds.eps_schedule", b.eps_schedule, SCHEDULES)
    _at_least(errors, "bounds.eps_start", b.eps_start, 0.0)
    _at_least(errors, "bounds.eps_length", b.eps_length, 0.0)
    _choices(errors, "bounds.init", b.init, ("ibp", "default"))
    _at_least(errors, "bounds.reg_lambda", b.reg_lambda, 0.0)
    _at_least(errors, "bounds.reg_tol", b.reg_tol, 0.0, strict=True)
    bad = [t for t in b.reg_terms if t not in TERMS]
    if bad:
        errors.append(f"bounds.reg_terms={list(b.reg_terms)!r}: unknown term(s) {', '.join(map(repr, bad))}; allowed: {', '.join(TERMS)}")
    _choices(errors, "bounds.verify", b.verify, ("ibp", "crown-ibp"))
    if cfg.method.name in ("ibp", "crown-ibp") and b.engine in ENGINES:
        if cfg.attack.norm != "linf":
            errors.append(f"attack.norm={cfg.attack.norm!r}: method {cfg.method.name} certifies l_inf balls only (use linf)")
        try:
            require_engine(b.engine)
        except ImportError as err:
            errors.append(str(err))


def _check_recipes(cfg, errors: list[str]) -> None:
    """The DAT recipes: LALR options, semi-supervised AT (data.num_labeled, semisup.*), fine-tuning (train.init_from)."""
    from datkit.optim.lalr import BASES, EXCLUDE_CHOICES

    o, d, ss, t = cfg.optim, cfg.data, cfg.semisup, cfg.train
    _choices(errors, "optim.lalr_base", o.lalr_base, BASES)
    _choices(errors, "optim.lalr_exclude", o.lalr_exclude, EXCLUDE_CHOICES)
    _at_least(errors, "optim.c_l", o.c_l, 0.0)
    if o.c_u < o.c_l:
        errors.append(f"optim.c_u={o.c_u!r} must be >= optim.c_l={o.c_l!r} (tau = min(max(||theta||, c_l), c_u))")
    _at_least(errors, "data.resize", d.resize, 0)
    _at_least(errors, "data.num_labeled", d.num_labeled, 0)
    _at_least(errors, "semisup.teacher_epochs", ss.teacher_epochs, 1)
    _at_least(errors, "semisup.num_unlabeled", ss.num_unlabeled, 0)
    if not 0.0 < ss.unlabeled_fraction < 1.0:
        errors.append(f"semisup.unlabeled_fraction={ss.unlabeled_fraction!r} must be in (0, 1) (the share of every batch "
                      f"that is pseudo-labeled)")
    if ss.enabled and d.num_labeled <= 0:
        errors.append("semisup.enabled=true needs data.num_labeled > 0 (the labeled part; the rest of the training set is "
                      "pseudo-labeled)")
    if (t.freeze_backbone or t.new_head) and not t.init_from:
        errors.append("train.freeze_backbone / train.new_head apply to fine-tuning only: set train.init_from")


def validate_config(cfg) -> None:
    """Raise ``ConfigError`` listing every impossible value in ``cfg``."""
    from datkit.backends import BACKEND_CHOICES
    from datkit.methods import METHODS
    from datkit.models import MODELS
    from datkit.optim import OPTIMIZERS, SCHEDULES

    e: list[str] = []
    _choices(e, "backend", cfg.backend, BACKEND_CHOICES)
    _choices(e, "device", cfg.device, ("auto", "cpu", "cuda"))
    _check_data(cfg, e)
    _choices(e, "model.name", cfg.model.name, MODELS.names())
    _choices(e, "method.name", cfg.method.name, METHODS.names())
    _at_least(e, "method.lam", cfg.method.lam, 0.0)
    _at_least(e, "method.beta", cfg.method.beta, 0.0)
    a = cfg.attack
    _at_least(e, "attack.eps", a.eps, 0.0)
    _at_least(e, "attack.alpha", a.alpha, 0.0, strict=True)
    _at_least(e, "attack.steps", a.steps, 1)
    _choices(e, "attack.norm", a.norm, ("linf", "l2"))
    _at_least(e, "attack.eps_warmup_epochs", a.eps_warmup_epochs, 0.0)
    if cfg.method.name in ("fgsm", "trades") and a.norm != "linf":
        e.append(f"attack.norm={a.norm!r}: method {cfg.method.name} supports only linf")
    o = cfg.optim
    _choices(e, "optim.name", o.name, OPTIMIZERS.names())
    _at_least(e, "optim.lr", o.lr, 0.0, strict=True)
    _at_least(e, "optim.weight_decay", o.weight_decay, 0.0)
    if not 0.0 <= o.momentum < 1.0:
        e.append(f"optim.momentum={o.momentum!r} must be in [0, 1)")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        e.append(f"optim.betas={list(o.betas)!r} must be two numbers in [0, 1)")
    _at_least(e, "optim.base_batch_size", o.base_batch_size, 1)
    s = cfg.schedule
    _choices(e, "schedule.name", s.name, SCHEDULES)
    _at_least(e, "schedule.warmup_epochs", s.warmup_epochs, 0.0)
    if not 0.0 < s.gamma <= 1.0:
        e.append(f"schedule.gamma={s.gamma!r} must be in (0, 1]")
    if list(s.milestones) != sorted(s.milestones) or any(m < 0 for m in s.milestones):
        e.append(f"schedule.milestones={list(s.milestones)!r} must be non-negative and increasing")
    if not 0.0 <= s.min_lr_ratio <= 1.0:
        e.append(f"schedule.min_lr_ratio={s.min_lr_ratio!r} must be in [0, 1]")
    t = cfg.train
    _at_least(e, "train.epochs", t.epochs, 1)
    _at_least(e, "train.batch_size", t.batch_size, 1)
    _at_least(e, "train.grad_accum", t.grad_accum, 1)
    _at_least(e, "train.grad_clip", t.grad_clip, 0.0)
    _at_least(e, "train.max_steps", t.max_steps, 0)
    _at_least(e, "train.checkpoint_every", t.checkpoint_every, 0)
    if t.grad_accum >= 1 and t.batch_size % t.grad_accum:
        e.append(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
    v = cfg.eval
    _at_least(e, "eval.every", v.every, 1)
    _at_least(e, "eval.num_samples", v.num_samples, 0)
    _at_least(e, "eval.final_num_samples", v.final_num_samples, 0)
    _at_least(e, "eval.batch_size", v.batch_size, 1)
    _at_least(e, "eval.eps", v.eps, 0.0)
    _at_least(e, "eval.pgd_steps", v.pgd_steps, 1)
    _at_least(e, "eval.pgd_alpha", v.pgd_alpha, 0.0, strict=True)
    _at_least(e, "eval.pgd_restarts", v.pgd_restarts, 1)
    _at_least(e, "dist.timeout_s", cfg.dist.timeout_s, 1)
    _at_least(e, "dist.bucket_cap_mb", cfg.dist.bucket_cap_mb, 0.0, strict=True)
    _check_faults(cfg, e)
    _check_compression(cfg, e)
    _check_deepspeed(cfg, e)
    _check_smoothing(cfg, e)
    _check_bounds(cfg, e)
    _check_recipes(cfg, e)
    if e:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(e))


def validate_for_training(cfg) -> None:
    """Checks of files a training run reads (not repeated when a finished run's config is evaluated):
    ``train.init_from`` (unless the run resumes from its own checkpoint) and ``semisup.teacher``."""
    from datkit.engine.trainer import CHECKPOINT

    e: list[str] = []
    t, ss = cfg.train, cfg.semisup
    resuming = t.resume and os.path.isfile(os.path.join(t.output_dir, CHECKPOINT))
    if t.init_from and not resuming and not os.path.isfile(t.init_from):
        e.append(f"train.init_from={t.init_from!r}: no such checkpoint file (a datkit checkpoint, e.g. "
                 f"runs/<name>/checkpoint_last.pt, or null to train from scratch)")
    if ss.enabled and ss.teacher != "train" and not os.path.isfile(ss.teacher):
        e.append(f"semisup.teacher={ss.teacher!r}: no such checkpoint file (a datkit checkpoint, or 'train' to train "
                 f"a clean teacher on the labeled examples)")
    if e:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(e))


def validate_for_world(cfg, world_size: int) -> None:
    """Checks that depend on the number of workers (the global batch must split evenly)."""
    per = world_size * cfg.train.grad_accum
    if cfg.train.batch_size % per:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by world_size * train.grad_accum = "
                          f"{world_size} * {cfg.train.grad_accum} = {per} (it is the global batch, split across workers)")
    if cfg.semisup.enabled:
        g_u = round(cfg.semisup.unlabeled_fraction * cfg.train.batch_size)
        if g_u % world_size or g_u == 0 or g_u == cfg.train.batch_size:
            raise ConfigError(f"semisup.unlabeled_fraction={cfg.semisup.unlabeled_fraction} of train.batch_size="
                              f"{cfg.train.batch_size} gives {g_u} pseudo-labeled and {cfg.train.batch_size - g_u} labeled "
                              f"examples per global batch: both must be > 0 and divisible by world_size={world_size}")
    if cfg.eval.batch_size < world_size:
        raise ConfigError(f"eval.batch_size={cfg.eval.batch_size} must be >= world_size={world_size}")
