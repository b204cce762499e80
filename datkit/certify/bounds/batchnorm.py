"""BatchNorm in bound propagation: its rule and the batch statistics it uses in training mode.

A BatchNorm layer is the per-channel affine map ``scale * h + shift`` with
``scale = weight / sqrt(var + eps)`` and ``shift = bias - mean * scale``. In eval mode ``mean``/``var``
are the running statistics. In training mode they are the statistics of the *clean* batch, recorded
while the clean forward pass runs (as auto_LiRPA does and Shi et al. 2021 train with): the bounds then
hold for the network whose normalization that clean batch defines, and gradients flow through the
statistics as they do in the forward pass.

Workers: a ``SyncBatchNorm`` / :class:`~datkit.models.sync_batchnorm.GlobalBatchNorm` layer normalizes with
the statistics of the *global* batch (all workers), and so do its bounds: :func:`batch_mean_var` reduces
its sums over the layer's process group with the differentiable ``torch.distributed.nn`` all-reduce,
exactly when the layer's forward synchronises (training mode, an initialised process group of more than
one process). A plain ``BatchNorm`` uses each worker's own batch, like its forward pass;
``model.sync_bn=true`` gives every worker the same statistics, which is what makes an N-worker run equal
to one worker with the N-times larger batch.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from datkit.models.sync_batchnorm import global_mean_var, sync_group

from .core import Rule, register_module
from .rules_affine import channel_affine_backward, channel_affine_ibp

Stats = dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]


def uses_batch_stats(m: _BatchNorm) -> bool:
    """True when the layer normalizes with batch statistics (as ``_BatchNorm.forward`` decides)."""
    return m.training or (m.running_mean is None and m.running_var is None)


def batch_mean_var(m: _BatchNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` (channel dimension 1) as layer ``m`` normalizes it: over
    the global batch for a SyncBatchNorm / GlobalBatchNorm in training mode, else over ``x``."""
    group = sync_group(m)
    if group is not None:
        mean, var, _ = global_mean_var(x, group)
        return mean, var
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims)  # two passes, written out: faster on CPU than Tensor.var over several dimensions
    return mean, (x - mean.view((1, -1) + (1,) * (x.dim() - 2))).square().mean(dims)


@contextlib.contextmanager
def record_batch_stats(model: nn.Module) -> Iterator[Stats]:
    """Record, for each BatchNorm of ``model`` that uses batch statistics, the statistics of its input
    during the forward passes run inside the block (through ``model`` or a wrapper of it, such as DDP)."""
    stats: Stats = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        stats[module] = batch_mean_var(module, inputs[0])

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, _BatchNorm) and uses_batch_stats(m)]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def needs_batch_stats(model: nn.Module) -> bool:
    """True if some BatchNorm of ``model`` would normalize with batch statistics."""
    return any(isinstance(m, _BatchNorm) and uses_batch_stats(m) for m in model.modules())


def clean_batch_stats(model: nn.Module, x: torch.Tensor) -> Stats:
    """Batch statistics of a clean forward pass of ``model`` on ``x`` that leaves the running statistics alone
    (``track_running_stats`` is switched off for the pass: no buffer is written, so no autograd graph is disturbed)."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        with record_batch_stats(model) as stats:
            model(x)
    finally:
        for m in bns:
            m.track_running_stats = True
    return stats


@register_module(_BatchNorm)
class BatchNormRule(Rule):
    """BatchNorm1d/2d/SyncBatchNorm as a per-channel affine map (see the module docstring)."""

    def affine(self, step, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        cached = ctx.cache.get(step.name)
        if cached is not None:
            return cached
        m = step.module
        if uses_batch_stats(m):
            if m not in ctx.batch_stats:
                raise RuntimeError(f"datkit.certify: {step.label} normalizes with batch statistics (training mode) "
                                   "but none were recorded for it: run the clean forward pass inside "
                                   "record_batch_stats(model) and pass its result as batch_stats=")
            mean, var = ctx.batch_stats[m]
        else:
            mean, var = m.running_mean, m.running_var
        scale = torch.rsqrt(var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        shift = -mean * scale
        if m.bias is not None:
            shift = shift + m.bias
        ctx.cache[step.name] = (scale, shift)
        return scale, shift

    def ibp(self, step, args, ctx):
        return channel_affine_ibp(args[0], *self.affine(step, ctx))

    def backward(self, step, A, ctx):
        A_in, bias = channel_affine_backward(A, *self.affine(step, ctx))
        return [(step.args[0].name, A_in)], bias
