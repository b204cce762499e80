"""Robust pre-training then fine-tuning (DAT paper, Figure 2): ``train.init_from=<checkpoint>``.

The new run's model is built as usual (``model.*`` for the new data set), then every tensor of the
checkpoint's model is copied into it, except the classification head -- the last ``nn.Linear`` of the
model in module order -- when its shape differs (a new number of classes) or ``train.new_head`` asks for a
fresh one; the head then keeps its new initialization. Every other tensor (input normalization buffers
included: the backbone was trained on inputs normalized that way) must exist in both models with the same
shape, otherwise a ``ConfigError`` names the checkpoint's model, this run's model and the tensors that do
not fit. ``train.freeze_backbone`` then leaves only the head trainable (``requires_grad=False`` elsewhere;
BatchNorm running statistics of a frozen backbone still update in training mode). Adversarial or clean
fine-tuning is just ``method.name``.
"""
from __future__ import annotations

from typing import Any

import torch
import yaml
from torch import nn

from datkit.checkpoint import load_checkpoint_file
from datkit.config.errors import ConfigError


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(qualified name, module) of the last ``nn.Linear`` in ``model.named_modules()`` order: the classifier head."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError(f"train.init_from: model {type(model).__name__} has no nn.Linear layer to use as the "
                          f"classification head")
    return found[-1]


def freeze_all_but_head(model: nn.Module) -> None:
    """``requires_grad=False`` for every parameter outside the last ``nn.Linear`` (``train.freeze_backbone``)."""
    head_name, head = last_linear(model)
    head_params = {id(p) for p in head.parameters()}
    for p in model.parameters():
        if id(p) not in head_params:
            p.requires_grad_(False)


def read_checkpoint(path: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, the run's config as a dict) of the datkit checkpoint ``path``; ``key`` names the
    config option that pointed at it, for error messages."""
    try:
        state = load_checkpoint_file(path)
    except FileNotFoundError:
        raise ConfigError(f"{key}={path!r}: no such checkpoint file") from None
    except Exception as err:  # not a zip / pickle torch can load with weights_only=True
        raise ConfigError(f"{key}={path!r} cannot be loaded with torch.load(weights_only=True) ({type(err).__name__}); "
                          f"is it a datkit checkpoint?") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ConfigError(f"{key}={path!r} is not a datkit checkpoint (no 'model' state dict)")
    cfg = yaml.safe_load(state.get("config") or "") or {}
    return state["model"], cfg if isinstance(cfg, dict) else {}


def _describe_model(cfg: dict[str, Any]) -> str:
    model, data = cfg.get("model", {}) or {}, cfg.get("data", {}) or {}
    return f"model {model.get('name', '?')} (kwargs {model.get('kwargs', {})}) trained on {data.get('name', '?')}"


def init_from_checkpoint(model: nn.Module, path: str, new_head: bool = False, freeze_backbone: bool = False,
                         run_model: str = "?") -> str:
    """Load ``path``'s weights into ``model`` with head replacement (see the module docstring); returns a
    one-line description for the log. ``run_model`` names this run's model in error messages."""
    saved, saved_cfg = read_checkpoint(path, "train.init_from")
    head_name, head = last_linear(model)
    head_keys = {f"{head_name}.{k}" for k, _ in head.named_parameters(recurse=False)}
    own = model.state_dict()
    missing = [k for k in own if k not in saved and k not in head_keys]
    unexpected = [k for k in saved if k not in own and k not in head_keys]
    wrong = [f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in saved and k not in head_keys and saved[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        details = "; ".join(filter(None, [
            f"shapes differ (checkpoint vs this run): {', '.join(wrong[:4])}" if wrong else "",
            f"not in the checkpoint: {', '.join(missing[:4])}" if missing else "",
            f"only in the checkpoint: {', '.join(unexpected[:4])}" if unexpected else ""]))
        raise ConfigError(f"train.init_from={path!r}: the checkpoint's {_describe_model(saved_cfg)} does not fit this "
                          f"run's model {run_model} (everything but the last Linear layer '{head_name}' must match; set "
                          f"model.name / model.kwargs / data.resize like the pre-training run): {details}")
    keep_head = not new_head and all(k in saved and saved[k].shape == own[k].shape for k in head_keys)
    load = {k: v for k, v in saved.items() if k in own and (keep_head or k not in head_keys)}
    model.load_state_dict(load, strict=False)
    old_classes = saved[f"{head_name}.weight"].shape[0] if f"{head_name}.weight" in saved else "?"
    how = "kept" if keep_head else f"replaced ({old_classes} -> {head.out_features} classes, new initialization)"
    if freeze_backbone:
        freeze_all_but_head(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (f"init_from {path}: {len(load)} tensors loaded, head '{head_name}' {how}"
            f"{', backbone frozen' if freeze_backbone else ''}; {trainable:,} trainable parameters")
