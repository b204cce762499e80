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

from datkit.checkpoint import CheckpointError, load_datkit_checkpoint, state_dict_mismatch
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
    """(model state dict, the run's config as a dict) of the datkit checkpoint ``path``
    (``datkit.checkpoint.load_datkit_checkpoint``: a one-line ``CheckpointError`` naming ``key`` when the file
    is missing, a pickle payload, truncated or not a datkit checkpoint)."""
    state = load_datkit_checkpoint(path, key)
    cfg = yaml.safe_load(state["config"]) or {}
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
    details = state_dict_mismatch(saved, own, skip=sorted(head_keys))
    if details:
        raise CheckpointError("train.init_from", path, f"a checkpoint of another model: the checkpoint's "
                              f"{_describe_model(saved_cfg)} does not fit this run's model {run_model} (everything but "
                              f"the last Linear layer '{head_name}' must match; set model.name / model.kwargs / "
                              f"data.resize like the pre-training run): {details}")
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
