"""BatchNorm with the statistics of the global batch across workers, on any device (``model.sync_bn``).

``torch.nn.SyncBatchNorm`` normalizes with the mean and variance of the batch of *all* workers, but only on
GPUs ("SyncBatchNorm layers only work with GPU modules" on CPU). :class:`GlobalBatchNorm` does the same
with plain tensor operations and the differentiable all-reduce of ``torch.distributed.nn`` (two per
layer: the per-channel sums and counts, then the sums of squared deviations), so it runs on CPU with gloo
too. :func:`convert_sync_batchnorm` picks torch's layer on CUDA and this one elsewhere.

With global statistics, N workers with local batch B compute exactly what one worker computes with the
batch N*B (forward, backward, running statistics), and certified training's bounds, which use the clean
batch's statistics, agree across workers (``datkit.certify.bounds.batchnorm``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def sync_group(m: nn.Module):
    """The process group whose global batch ``m`` (a SyncBatchNorm / GlobalBatchNorm in training mode) normalizes
    with, or None when it uses its own batch (no initialised process group, one process, eval mode, plain BN)."""
    if not (isinstance(m, (nn.SyncBatchNorm, GlobalBatchNorm)) and m.training):
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = m.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def global_mean_var(x: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, biased variance and element count of ``x`` (channels on dimension 1) over every
    worker of ``group``; differentiable (gradients flow back to every worker's ``x``)."""
    from torch.distributed.nn.functional import all_reduce

    dims = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    count = torch.full((1,), float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
    total = all_reduce(torch.cat([x.sum(dims), count]), group=group)
    n = total[-1]
    mean = total[:-1] / n
    var = all_reduce((x - mean.view(shape)).square().sum(dims), group=group) / n
    return mean, var, n


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm (any input ``(N, C, ...)``) normalizing with the global batch's statistics in training mode."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = sync_group(self)
        if group is None:
            return super().forward(x)
        self._check_input_dim(x)
        mean, var, n = global_mean_var(x, group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(factor * mean.detach())
                self.running_var.mul_(1 - factor).add_(factor * var.detach() * n / (n - 1).clamp(min=1))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` made global across workers: ``torch.nn.SyncBatchNorm`` on CUDA,
    :class:`GlobalBatchNorm` on other devices (parameters and running statistics are kept)."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, (nn.SyncBatchNorm, GlobalBatchNorm)):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module
