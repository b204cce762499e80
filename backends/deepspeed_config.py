"""The DeepSpeed JSON config built from datkit's config (``deepspeed.*``, ``train.*``), or merged with
a user's file (``deepspeed.config_file``: its keys win, except the batch sizes, which datkit owns)."""
from __future__ import annotations

import json
import os
from typing import Any

from datkit.config import ConfigError

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(cfg: Any, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed config for ``cfg`` (a ``spec.BackendSpec`` or the whole config: ``deepspeed.*``, ``train.*``) on
    ``world_size`` workers (see module docstring)."""
    d, t = cfg.deepspeed, cfg.train
    micro = t.batch_size // (world_size * t.grad_accum)
    zero: dict[str, Any] = {"stage": int(d.zero_stage), "overlap_comm": bool(on_gpu)}
    if d.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": d.offload_optimizer}
    if d.offload_param != "none":
        zero["offload_param"] = {"device": d.offload_param}
    ds: dict[str, Any] = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # datkit's optimizers (Adam, SGD, LALR) are client optimizers
        "fp16": {"enabled": bool(d.fp16)},
        "bf16": {"enabled": bool(d.bf16)},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if d.config_file:
        if not os.path.isfile(d.config_file):
            raise ConfigError(f"deepspeed.config_file={d.config_file!r}: no such file")
        try:
            with open(d.config_file) as f:
                user = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"deepspeed.config_file={d.config_file!r} is not valid JSON: {err}") from None
        for k in _BATCH_KEYS:
            if k in user and user[k] not in ("auto", ds[k]):
                raise ConfigError(f"deepspeed.config_file sets {k}={user[k]!r}, but datkit's train.batch_size / "
                                  f"train.grad_accum give {ds[k]}; set batch sizes in datkit's config (or 'auto')")
            user.pop(k, None)
        ds = _merge(ds, user)
    return ds


def deepspeed_config_errors(cfg) -> list[str]:
    """Errors in ``deepspeed.*``: stage 0-3, offload devices and the stages they need, one precision at a time."""
    from datkit.config import choices

    d, errors = cfg.deepspeed, []
    choices(errors, "deepspeed.zero_stage", d.zero_stage, (0, 1, 2, 3))
    choices(errors, "deepspeed.offload_optimizer", d.offload_optimizer, ("none", "cpu"))
    choices(errors, "deepspeed.offload_param", d.offload_param, ("none", "cpu"))
    if d.offload_optimizer != "none" and d.zero_stage < 1:
        errors.append("deepspeed.offload_optimizer=cpu needs deepspeed.zero_stage >= 1")
    if d.offload_param != "none" and d.zero_stage != 3:
        errors.append("deepspeed.offload_param=cpu needs deepspeed.zero_stage=3")
    if d.fp16 and d.bf16:
        errors.append("deepspeed.fp16 and deepspeed.bf16 are both true; choose one")
    return errors


def zero_stage_errors(cfg) -> list[str]:
    """``refuse_at_zero_stage`` at preflight for ``backend: deepspeed`` (the stage from ``deepspeed.zero_stage`` or the
    ``deepspeed.config_file``), so that what a ZeRO stage cannot carry is refused before DeepSpeed is imported and
    before any worker starts its process group. ``backend: auto`` under the deepspeed launcher is refused when the
    backend is built, by the same function."""
    if cfg.backend != "deepspeed":
        return []
    stage = cfg.deepspeed.zero_stage
    if cfg.deepspeed.config_file and os.path.isfile(cfg.deepspeed.config_file):
        try:
            with open(cfg.deepspeed.config_file) as f:
                stage = json.load(f).get("zero_optimization", {}).get("stage", stage)
        except (OSError, ValueError, AttributeError):
            pass  # reported when the backend builds its config
    if stage not in (0, 1, 2, 3):
        return []  # deepspeed_config_errors names it
    try:
        refuse_at_zero_stage(cfg, int(stage))
    except ConfigError as err:
        return [str(err)]
    except Exception:  # noqa: BLE001 -- a plug-in that does not load: its own section's check names it
        return []
    return []


def refuse_at_zero_stage(cfg: Any, stage: int) -> None:
    """Raise ``ConfigError`` for the first option that ``stage`` cannot carry (each rule: minimum stage, test, why);
    ``cfg``: a ``spec.BackendSpec`` or the whole config (``compression``, ``optim``, ``method``, ``train`` sections).
    Plug-ins state what they need as attributes (``reads_parameters`` of a method, ``needs_whole_layers`` of an
    optimizer factory); no rule tests a plug-in's name."""
    from datkit.methods import METHODS
    from datkit.optim import OPTIMIZERS

    rules = [
        (1, cfg.compression.name != "none",
         f"compression.name={cfg.compression.name} needs ZeRO stage 0 (deepspeed.zero_stage, or the stage in "
         f"deepspeed.config_file; got {stage}): ZeRO >= 1 reduce-scatters gradients into "
         "optimizer-state partitions inside DeepSpeed, where a compressor cannot take over (DeepSpeed's own "
         "1-bit optimizers refused ZeRO >= 1 for the same reason). Choose deepspeed.zero_stage=0 with "
         "compression, or compression.name=none with ZeRO."),
        (1, getattr(OPTIMIZERS.get(cfg.optim.name), "communicates", False),
         f"optim.name={cfg.optim.name} needs ZeRO stage 0 (deepspeed.zero_stage, or the stage in "
         f"deepspeed.config_file; got {stage}): it exchanges the whole momentum itself after its warm-up, "
         "while ZeRO >= 1 reduce-scatters gradients into optimizer-state partitions inside DeepSpeed "
         "(DeepSpeed's own 1-bit Adam refused ZeRO >= 1 too). Use deepspeed.zero_stage=0, or backend=torch / horovod"),
        (1, getattr(OPTIMIZERS.get(cfg.optim.name), "needs_whole_layers", False),
         f"optim.name={cfg.optim.name} with ZeRO stage {stage}: ZeRO >= 1 hands the client optimizer flattened "
         "partitions of many layers, so a per-layer trust ratio (LALR's) would be computed per partition; use "
         "deepspeed.zero_stage=0 (or backend=torch)"),
        (3, getattr(METHODS.get(cfg.method.name), "reads_parameters", False),
         f"method.name={cfg.method.name} with ZeRO stage 3: its bounds read every layer's weights directly, "
         "and ZeRO-3 keeps only this worker's partition of them outside forward(); use "
         "deepspeed.zero_stage=0, 1 or 2 (or backend=torch)"),
        (1, cfg.train.nonfinite == "skip",
         f"train.nonfinite=skip with ZeRO stage {stage}: ZeRO >= 1 keeps gradients in its own "
         "partitions, which datkit cannot drop (DeepSpeed's ZeRO optimizer already skips a step whose "
         "partitioned gradients overflow); use train.nonfinite=stop, or deepspeed.zero_stage=0"),
    ]
    for min_stage, applies, why in rules:
        if stage >= min_stage and applies:
            raise ConfigError(why)
