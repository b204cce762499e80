"""Bound rules of the affine layers: Linear, Conv2d, the in-model normalization, average pooling.

For an affine map ``f(h) = W h + b`` and a box ``h in [c - r, c + r]`` the tightest interval is
``f(c) -+ |W| r`` (IBP, Gowal et al. 2018); the backward rule of ``A @ f(h)`` is ``(A W) @ h + A b``
(exact, no relaxation). Per-channel affine maps (BatchNorm, :class:`~datkit.models.Normalize`) share
:func:`channel_affine_ibp` / :func:`channel_affine_backward`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datkit.models.normalize import Normalize

from .core import Interval, Rule, UnsupportedLayer, register_module, rows_sum


def channel_affine_ibp(iv: Interval, scale: torch.Tensor, shift: torch.Tensor) -> Interval:
    """Interval of ``scale[c] * h + shift[c]`` (channel dimension 1) for ``h`` in ``iv``."""
    shape = (1, -1) + (1,) * (len(iv.shape) - 2)
    s, t = scale.reshape(shape), shift.reshape(shape)
    return Interval.from_center_radius(iv.center * s + t, iv.radius * s.abs())


def channel_affine_backward(A: torch.Tensor, scale: torch.Tensor,
                            shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A @ (scale * h + shift) = (A * scale) @ h + bias``; ``A`` is ``(B, K, C, ...)``."""
    shape = (1, 1, -1) + (1,) * (A.dim() - 3)
    per_channel = A.flatten(3).sum(-1) if A.dim() > 3 else A
    return A * scale.reshape(shape), per_channel @ shift.reshape(-1).expand(per_channel.shape[-1])


def folded(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
           shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``scale * (W h + b) + shift`` (per output channel): a layer followed by a BatchNorm,
    bounded as one affine map, which saves the BatchNorm's element-wise passes over the activations."""
    w = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    return w, (shift if bias is None else bias * scale + shift)


class AffineRule(Rule):
    """A layer ``W h + b`` (``forward(step, h, W, b)``): IBP is ``forward(center) -+ |W|-forward(radius)``;
    ``ibp_then`` bounds it together with a per-channel affine map (a BatchNorm) that follows it; ``ibp_with`` /
    ``backward_with`` take the (folded) weight and bias explicitly."""

    def forward(self, step, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _ibp(self, step, iv: Interval, weight: torch.Tensor, bias: torch.Tensor | None) -> Interval:
        return Interval.from_center_radius(self.forward(step, iv.center, weight, bias),
                                           self.forward(step, iv.radius, weight.abs(), None))

    def ibp(self, step, args, ctx):
        return self._ibp(step, args[0], step.module.weight, step.module.bias)

    def ibp_with(self, step, iv: Interval, weight: torch.Tensor, bias: torch.Tensor | None) -> Interval:
        """``ibp`` of the layer with ``weight`` / ``bias`` in place of its own (e.g. folded with a BatchNorm)."""
        return self._ibp(step, iv, weight, bias)

    def ibp_then(self, step, iv: Interval, scale: torch.Tensor, shift: torch.Tensor) -> Interval:
        return self._ibp(step, iv, *folded(step.module.weight, step.module.bias, scale, shift))

    def backward_with(self, step, A: torch.Tensor, ctx, weight: torch.Tensor, bias: torch.Tensor | None):
        """``backward`` of the layer with ``weight`` / ``bias`` in place of its own."""
        raise NotImplementedError

    def backward(self, step, A, ctx):
        return self.backward_with(step, A, ctx, step.module.weight, step.module.bias)


@register_module(nn.Linear)
class LinearRule(AffineRule):
    """``W h + b`` over the last dimension."""

    def forward(self, step, h, weight, bias):
        return F.linear(h, weight, bias)

    def ibp_spec(self, step, iv: Interval, C: torch.Tensor) -> Interval:
        """Interval of ``C (W h + b)`` with ``C W`` formed first (tighter than ``C`` times the logits' box)."""
        m = step.module
        W = C @ m.weight  # (B, K, in)
        center = (W @ iv.center.unsqueeze(-1)).squeeze(-1)
        if m.bias is not None:
            center = center + C @ m.bias
        return Interval.from_center_radius(center, (W.abs() @ iv.radius.unsqueeze(-1)).squeeze(-1))

    def backward_with(self, step, A, ctx, weight, bias):
        return [(step.args[0].name, A @ weight)], (rows_sum(A @ bias) if bias is not None else None)


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if m.padding_mode != "zeros":
        raise UnsupportedLayer(f"datkit.certify: Conv2d with padding_mode={m.padding_mode!r} (only 'zeros')")
    if m.padding == "valid":
        return (0, 0)
    if isinstance(m.padding, str):
        raise UnsupportedLayer("datkit.certify: Conv2d with padding='same' (give the padding as numbers)")
    return tuple(m.padding)  # type: ignore[return-value]


def transposed(A: torch.Tensor, weight: torch.Tensor, in_shape: torch.Size, stride, padding, dilation,
               groups: int) -> torch.Tensor:
    """``A`` (B, K, C_out, H_out, W_out) through the transpose of ``conv2d(., weight)`` -> (B, K, *in_shape[1:])."""
    B, K = A.shape[:2]
    out_hw, k = A.shape[-2:], weight.shape[-2:]
    extra = [in_shape[2 + i] - ((out_hw[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[i] - 1) + 1)
             for i in range(2)]
    out = F.conv_transpose2d(A.reshape(B * K, *A.shape[2:]), weight, None, stride, padding, extra, groups, dilation)
    return out.view(B, K, *in_shape[1:])


@register_module(nn.Conv2d)
class Conv2dRule(AffineRule):
    """2-d convolution (any stride, padding, dilation, groups; zero padding)."""

    def forward(self, step, h, weight, bias):
        m = step.module
        return F.conv2d(h, weight, bias, m.stride, _conv_padding(m), m.dilation, m.groups)

    def backward_with(self, step, A, ctx, weight, bias):
        m, name = step.module, step.args[0].name
        A_in = transposed(A, weight, ctx.shape(name), m.stride, _conv_padding(m), m.dilation, m.groups)
        return [(name, A_in)], (A.flatten(3).sum(-1) @ bias if bias is not None else None)


@register_module(Normalize)
class NormalizeRule(Rule):
    """The in-model normalization ``(x - mean) / std`` (per channel; std > 0)."""

    def ibp(self, step, args, ctx):
        m = step.module
        return channel_affine_ibp(args[0], 1.0 / m.std.flatten(), -(m.mean / m.std).flatten())

    def backward(self, step, A, ctx):
        m = step.module
        A_in, bias = channel_affine_backward(A, 1.0 / m.std.flatten(), -(m.mean / m.std).flatten())
        return [(step.args[0].name, A_in)], bias


def linear_vjp(op, A: torch.Tensor, in_shape: torch.Size) -> torch.Tensor:
    """``A`` through the transpose of a parameter-free linear map ``op`` (its vector-Jacobian product, which is
    exact for a linear map at any point); differentiable in ``A``."""
    B, K = A.shape[:2]
    with torch.enable_grad():
        z = torch.zeros((B * K, *in_shape[1:]), dtype=A.dtype, device=A.device, requires_grad=True)
        out = op(z)
        (A_in,) = torch.autograd.grad(out, z, A.reshape(B * K, *out.shape[1:]), create_graph=A.requires_grad)
    return A_in.view(B, K, *in_shape[1:])


@register_module(nn.AvgPool2d, nn.AdaptiveAvgPool2d)
class AvgPoolRule(Rule):
    """Average pooling (any kernel, stride, padding, output size): a linear map with non-negative weights, so
    the output's bounds are the pooled bounds; backward, ``A`` goes through its transpose."""

    def ibp(self, step, args, ctx):
        return args[0].map(step.module)

    def backward(self, step, A, ctx):
        name = step.args[0].name
        return [(name, linear_vjp(step.module, A, ctx.shape(name)))], None
