"""Value checks of the sections the training core owns, and the helpers every plug-in's own check uses.

Each message names the key and what is allowed (``ConfigError``). This module imports nothing of datkit
but ``errors``: the plug-ins (data, models, methods, optimizers, compressors, backends) check their own
sections, and ``datkit.preflight`` runs every check at once before any worker trains.
``validate_for_world`` adds the checks that depend on the number of workers.
"""
from __future__ import annotations

import importlib.util
import os

from .errors import ConfigError

CHECKPOINT = "checkpoint_last.pt"  # a run's last checkpoint, in train.output_dir


def resume_path(cfg) -> str | None:
    """The checkpoint this run resumes from: ``output_dir/checkpoint_last.pt`` with ``train.resume`` when it
    exists, else None (a fresh run). The one place that answers "resuming?"."""
    path = os.path.join(cfg.train.output_dir, CHECKPOINT)
    return path if cfg.train.resume and os.path.isfile(path) else None


def choices(errors: list[str], key: str, value: object, allowed) -> None:
    allowed = list(allowed)
    if value not in allowed:
        errors.append(f"{key}={value!r} is not one of: {', '.join(map(str, allowed))}")


def at_least(errors: list[str], key: str, value, minimum, strict: bool = False) -> None:
    if value is None:
        return
    if value < minimum or (strict and value == minimum):
        errors.append(f"{key}={value!r} must be {'>' if strict else '>='} {minimum}")


def _check_faults(cfg, errors: list[str]) -> None:
    """Lost workers and non-finite steps: dist.peer_timeout_s 0 (off) or >= 1; train.nonfinite stop | skip | ignore."""
    if cfg.dist.peer_timeout_s != 0:
        at_least(errors, "dist.peer_timeout_s", cfg.dist.peer_timeout_s, 1.0)
    choices(errors, "train.nonfinite", cfg.train.nonfinite, ("stop", "skip", "ignore"))
    at_least(errors, "train.max_nonfinite_skips", cfg.train.max_nonfinite_skips, 1)


def core_errors(cfg) -> list[str]:
    """Errors in the sections the training core owns (device, attack, train, eval, dist, faults); every plug-in
    (data, model, method, optimizer, compressor, backend) checks its own section (``datkit.preflight``)."""
    e: list[str] = []
    choices(e, "device", cfg.device, ("auto", "cpu", "cuda"))
    a = cfg.attack
    at_least(e, "attack.eps", a.eps, 0.0)
    at_least(e, "attack.alpha", a.alpha, 0.0, strict=True)
    at_least(e, "attack.steps", a.steps, 1)
    choices(e, "attack.norm", a.norm, ("linf", "l2"))
    at_least(e, "attack.eps_warmup_epochs", a.eps_warmup_epochs, 0.0)
    t = cfg.train
    at_least(e, "train.epochs", t.epochs, 1)
    at_least(e, "train.batch_size", t.batch_size, 1)
    at_least(e, "train.grad_accum", t.grad_accum, 1)
    at_least(e, "train.grad_clip", t.grad_clip, 0.0)
    at_least(e, "train.max_steps", t.max_steps, 0)
    at_least(e, "train.checkpoint_every", t.checkpoint_every, 0)
    at_least(e, "train.checkpoint_every_steps", t.checkpoint_every_steps, 0)
    if t.grad_accum >= 1 and t.batch_size % t.grad_accum:
        e.append(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
    if (t.freeze_backbone or t.new_head) and not t.init_from:
        e.append("train.freeze_backbone / train.new_head apply to fine-tuning only: set train.init_from")
    v = cfg.eval
    at_least(e, "eval.every", v.every, 1)
    at_least(e, "eval.num_samples", v.num_samples, 0)
    at_least(e, "eval.final_num_samples", v.final_num_samples, 0)
    at_least(e, "eval.batch_size", v.batch_size, 1)
    at_least(e, "eval.eps", v.eps, 0.0)
    at_least(e, "eval.pgd_steps", v.pgd_steps, 1)
    at_least(e, "eval.pgd_alpha", v.pgd_alpha, 0.0, strict=True)
    at_least(e, "eval.pgd_restarts", v.pgd_restarts, 1)
    at_least(e, "eval.aa_samples", v.aa_samples, 0)
    if v.aa_samples > 0 and importlib.util.find_spec("torchattacks") is None:
        e.append(f"eval.aa_samples={v.aa_samples}: AutoAttack needs torchattacks: pip install \"datkit[autoattack]\" "
                 "(or set eval.aa_samples=0 to skip AA)")
    at_least(e, "eval.co_samples", v.co_samples, 0)
    at_least(e, "eval.co_drop", v.co_drop, 0.0, strict=True)
    choices(e, "eval.co_action", v.co_action, ("stop", "warn"))
    at_least(e, "dist.timeout_s", cfg.dist.timeout_s, 1)
    at_least(e, "dist.bucket_cap_mb", cfg.dist.bucket_cap_mb, 0.0, strict=True)
    _check_faults(cfg, e)
    return e


def raise_errors(errors: list[str]) -> None:
    """Raise one ``ConfigError`` listing ``errors`` (nothing when empty)."""
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def validate_for_training(cfg) -> None:
    """Checks of files a training run reads (not repeated when a finished run's config is evaluated):
    ``train.init_from`` (unless the run resumes from its own checkpoint) and ``semisup.teacher``."""
    e: list[str] = []
    t, ss = cfg.train, cfg.semisup
    resuming = resume_path(cfg) is not None
    if t.init_from and not resuming and not os.path.isfile(t.init_from):
        e.append(f"train.init_from={t.init_from!r}: no such checkpoint file (a datkit checkpoint, e.g. "
                 f"runs/<name>/checkpoint_last.pt, or null to train from scratch)")
    if ss.enabled and ss.teacher != "train" and not os.path.isfile(ss.teacher):
        e.append(f"semisup.teacher={ss.teacher!r}: no such checkpoint file (a datkit checkpoint, or 'train' to train "
                 f"a clean teacher on the labeled examples)")
    raise_errors(e)


def validate_for_world(cfg, world_size: int) -> None:
    """Checks that depend on the number of workers (the global batch must split evenly)."""
    per = world_size * cfg.train.grad_accum
    if cfg.train.batch_size % per:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by "
                          f"world_size * train.grad_accum = {world_size} * {cfg.train.grad_accum} = {per} "
                          "(it is the global batch, split across workers)")
    if cfg.semisup.enabled:
        g_u = round(cfg.semisup.unlabeled_fraction * cfg.train.batch_size)
        if g_u % world_size or g_u == 0 or g_u == cfg.train.batch_size:
            raise ConfigError(f"semisup.unlabeled_fraction={cfg.semisup.unlabeled_fraction} of train.batch_size="
                              f"{cfg.train.batch_size} gives {g_u} pseudo-labeled and "
                              f"{cfg.train.batch_size - g_u} labeled "
                              f"examples per global batch: both must be > 0 and divisible by world_size={world_size}")
    if cfg.eval.batch_size < world_size:
        raise ConfigError(f"eval.batch_size={cfg.eval.batch_size} must be >= world_size={world_size}")
