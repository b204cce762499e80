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


def build_ds_config(cfg, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed config for ``cfg`` on ``world_size`` workers (see module docstring)."""
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
