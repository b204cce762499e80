"""Assembly of a run, apart from the loop: ``build_run(cfg, backend, ...) -> Run``.

One builder for every entry point (``datkit.train``, ``datkit.fit``, the benches, the semi-supervised
teacher): data and sampler, model (built from ``model.*``, or the user's module), the method and its model
preparation, fine-tuning, SyncBatchNorm, optimizer and scheduler, the backend's ``setup``, and the state of a
resumed run. ``Trainer`` (``datkit.engine.trainer``) only loops over a ``Run``.

Each plug-in checks its own config section as it is built (data, model, method, optimizer), so a bad value
found here is a ``ConfigError`` naming the key, raised on every worker before any of them trains.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from datkit.config import ConfigError, resume_path
from datkit.data import DataBundle, DatasetSpec, ShardedBatchSampler, build_data
from datkit.methods import Method, create_method
from datkit.models import NormalizedModel, create_model, wrap_model
from datkit.models.sync_batchnorm import convert_sync_batchnorm
from datkit.optim import build_optimizer, build_scheduler
from datkit.registry import PluginError
from datkit.semisup import semisup_training_set

from .cpu_runtime import set_cpu_threads, tune_malloc
from .trainer import Trainer
from .transfer import freeze_all_but_head, init_from_checkpoint


@dataclass
class Run:
    """Everything one training run holds; built by :func:`build_run`, looped over by ``Trainer``."""

    cfg: Any
    backend: Any
    data: DataBundle
    model: nn.Module  # as the backend wrapped it (DDP, a DeepSpeed engine, or the module itself)
    raw: nn.Module  # the plain module under any wrapper: attacks and bounds run on it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    method: Method
    sampler: Any  # ShardedBatchSampler, or the semi-supervised MixedBatchSampler
    steps_per_epoch: int
    resume_from: str | None = None  # the checkpoint the Trainer restores before its first epoch
    recipe_info: dict[str, Any] = field(default_factory=dict)  # reported in results.json's ``final``


def build_model(cfg, spec: DatasetSpec) -> nn.Module:
    """The model of ``cfg.model`` for dataset ``spec`` (normalization built in); a bad ``model.*`` raises
    ``ConfigError`` naming the key."""
    kwargs = OmegaConf.to_container(cfg.model.kwargs, resolve=True)
    try:
        return create_model(cfg.model.name, spec.num_classes, in_channels=spec.in_channels, image_size=spec.image_size,
                            mean=spec.mean, std=spec.std, **kwargs)
    except (KeyError, PluginError, TypeError, ValueError) as err:
        raise ConfigError(f"model.name={cfg.model.name!r}: {err.args[0] if err.args else err}") from None


def adopt_model(model: nn.Module, spec: DatasetSpec) -> nn.Module:
    """A user's module as datkit runs it: inside ``NormalizedModel`` with the data's mean/std (identity without
    ``data.mean`` / ``data.std``), exactly as ``build_model`` wraps ``model.name=MODULE:CALLABLE``. A
    ``NormalizedModel`` (a model datkit built) is used as it is."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got a {type(model).__name__}")
    if isinstance(model, NormalizedModel):
        return model
    return wrap_model(model, spec.mean, spec.std, spec.in_channels)


def build_run(cfg, backend, *, model: nn.Module | None = None, train_set: Dataset | None = None,
              test_set: Dataset | None = None,
              train_teacher: Callable[..., tuple[nn.Module, list[dict[str, Any]]]] | None = None) -> Run:
    """Assemble the run ``cfg`` describes on ``backend``.

    ``model``: a module to train instead of ``model.*`` (wrapped with the data's normalization, see
    :func:`adopt_model`; it is trained in place). ``train_set`` / ``test_set``: map-style datasets of
    ``(x float C x H x W in [0, 1], int label)`` instead of ``data.*`` (both or neither). ``train_teacher``:
    how the semi-supervised teacher is trained (default: a ``Trainer`` over a run of method ``clean``).
    Seeds: the model is initialized from ``train.seed``; a resumed run's weights come from its checkpoint
    when the ``Trainer`` starts.
    """
    t = cfg.train
    if t.malloc_tuning:
        tune_malloc()
    set_cpu_threads(t.threads, backend.local_world_size)
    torch.manual_seed(t.seed)
    data = build_data(cfg.data, train_set, test_set)
    resume_from = resume_path(cfg)
    # semi-supervised AT: teacher + pseudo-labels (data.num_labeled, semisup.*); otherwise the data as is
    train, mixed_sampler, recipe_info = semisup_training_set(cfg, backend, data, build_model,
                                                             train_teacher or _train_teacher)
    data = dataclasses.replace(data, train=train)
    net = build_model(cfg, data.spec) if model is None else adopt_model(model, data.spec)
    method = create_method(cfg)
    method.prepare_model(net)  # e.g. the IBP initialization of certified training
    if t.init_from and resume_from is None:  # fine-tuning (a resumed run gets its weights from its checkpoint)
        note = init_from_checkpoint(net, t.init_from, t.new_head, t.freeze_backbone,
                                    run_model=f"{cfg.model.name} (kwargs {OmegaConf.to_container(cfg.model.kwargs)}) "
                                              f"for {cfg.data.name} at {data.spec.image_size}x{data.spec.image_size}")
        recipe_info["init_from"] = t.init_from
        if backend.is_main:
            print(f"datkit: {note}", flush=True)
    elif t.freeze_backbone:
        freeze_all_but_head(net)
    # torch's SyncBatchNorm on CUDA, datkit's GlobalBatchNorm elsewhere
    if cfg.model.sync_bn and backend.world_size > 1:
        net = convert_sync_batchnorm(net, backend.device)
    optimizer = build_optimizer(cfg.optim, [p for p in net.parameters() if p.requires_grad], t.batch_size)
    wrapped, optimizer = backend.setup(net, optimizer)
    try:
        sampler = mixed_sampler or ShardedBatchSampler(len(data.train), t.batch_size, backend.rank, backend.world_size,
                                                       seed=t.seed)
    except ValueError as err:
        raise ConfigError(f"train.batch_size={t.batch_size}: {err}") from None
    steps = len(sampler) if t.max_steps <= 0 else min(len(sampler), t.max_steps)
    scheduler = build_scheduler(cfg.schedule, optimizer, steps, t.epochs)
    if hasattr(optimizer, "plan"):  # an optimizer whose phases are fractions of the run (1-bit Adam's freeze_step)
        optimizer.plan(steps * t.epochs)
    return Run(cfg=cfg, backend=backend, data=data, model=wrapped, raw=backend.unwrap(wrapped), optimizer=optimizer,
               scheduler=scheduler, method=method, sampler=sampler, steps_per_epoch=steps, resume_from=resume_from,
               recipe_info=recipe_info)


def teacher_config(cfg):
    """The semi-supervised teacher's run: ``cfg`` with method ``clean`` for ``semisup.teacher_epochs`` epochs on the
    labeled examples, TA-only evaluation, its own output folder ``output_dir/teacher`` (results and a resumable
    checkpoint), no semi-supervision, no fine-tuning."""
    t = OmegaConf.to_container(cfg, resolve=True)
    t["method"]["name"] = "clean"
    t["train"].update(epochs=cfg.semisup.teacher_epochs, output_dir=os.path.join(cfg.train.output_dir, "teacher"),
                      init_from=None, new_head=False, freeze_backbone=False)
    t["semisup"]["enabled"] = False
    t["data"].update(num_labeled=0, resize=0)  # the labeled examples come already split and resized
    t["eval"].update(robust=False, every=max(1, cfg.semisup.teacher_epochs))
    t["log"].update(tensorboard=False, plot=False)
    return OmegaConf.merge(cfg, t)


def _train_teacher(cfg, backend, model: nn.Module, labeled: Dataset, test: Dataset
                   ) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train ``model`` cleanly on ``labeled`` through a ``Trainer`` (every backend feature: DDP / ZeRO / Horovod,
    compression, checkpoints and resume, the non-finite check); returns the trained module (``model``, or its
    SyncBatchNorm conversion) and the per-epoch records."""
    tcfg = teacher_config(cfg)
    run = build_run(tcfg, backend, model=model, train_set=labeled, test_set=test)
    trainer = Trainer(run)
    trainer.train()
    # the student starts with fresh error-feedback residuals, as a separate job would
    if backend.compressor is not None:
        backend.compressor.reset()
    return run.raw, trainer.records
