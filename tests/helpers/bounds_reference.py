"""Bounds of small fully connected ReLU networks computed without datkit's bound engine (the references of
``tests/test_bounds.py``, ``tests/test_certified.py`` and, through ``backsubstitute``, ``tests/test_crown_bounds.py``).

A network is ``NormalizedModel(Normalize(mean, std), Sequential(Flatten, Linear, ReLU, ..., Linear))``; the
normalization is folded into the first layer, and the input box is ``[clamp(x - eps, 0, 1), clamp(x + eps, 0, 1)]``.

- ``ibp``: interval arithmetic, layer by layer (center / radius through each Linear, ReLU on the ends), the
  spec ``C`` folded into the last layer (``C W``, ``C b``);
- ``crown_ibp``: CROWN's backward pass (Zhang et al. 2018) with IBP's pre-activation bounds (CROWN-IBP, Zhang et
  al. 2020): ``C`` is pushed back through each layer, an unstable ReLU takes the upper line
  ``u/(u-l) (h - l)`` where its coefficient is negative and the lower line ``alpha h`` (``alpha = 1`` if
  ``u > -l``, else 0) where it is positive; the result is minimized over the box in closed form;
- ``lp``: the linear program of the triangle relaxation with the same IBP pre-activation bounds
  (``scipy.optimize.linprog``): the tightest bound any linear relaxation of these ReLUs gives, so for every
  row ``ibp <= lp`` and ``crown_ibp <= lp`` (CROWN is one feasible point of its dual), and ``lp <= min`` over
  the box of the true network (it relaxes the network).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def affine_layers(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    """The network's Linear layers as float64 ``(W, b)``, the input normalization folded into the first."""
    mean = model.normalize.mean.detach().double().flatten()
    std = model.normalize.std.detach().double().flatten()
    linears = [m for m in model.net.modules() if isinstance(m, nn.Linear)]
    kinds = [type(m) for m in model.net.children()]
    assert kinds == [nn.Flatten] + [nn.Linear, nn.ReLU] * (len(linears) - 1) + [nn.Linear], kinds
    layers = [(m.weight.detach().double().numpy().copy(), m.bias.detach().double().numpy().copy()) for m in linears]
    W, b = layers[0]
    d = W.shape[1]
    m_, s_ = ((mean.expand(d) if mean.numel() == 1 else mean).numpy(),
              (std.expand(d) if std.numel() == 1 else std).numpy())
    layers[0] = (W / s_, b - (W / s_) @ m_)  # W ((x - m) / s) + b
    return layers


def input_box(x: torch.Tensor, eps: float) -> tuple[np.ndarray, np.ndarray]:
    flat = x.detach().double().flatten(1)
    return (flat - eps).clamp(0, 1).numpy(), (flat + eps).clamp(0, 1).numpy()


def ibp_layers(layers, lo: np.ndarray, hi: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Interval of every Linear's output (pre-activations, then the logits) for one input box."""
    out = []
    for i, (W, b) in enumerate(layers):
        if i > 0:
            lo, hi = np.maximum(lo, 0), np.maximum(hi, 0)
        mu, r = (hi + lo) / 2, (hi - lo) / 2
        c, rad = W @ mu + b, np.abs(W) @ r
        lo, hi = c - rad, c + rad
        out.append((lo, hi))
    return out


def ibp(model: nn.Module, x: torch.Tensor, eps: float, C: torch.Tensor) -> np.ndarray:
    """IBP lower bounds of ``C[i] @ f(x')`` (``(B, K)``)."""
    layers = affine_layers(model)
    lo, hi = input_box(x, eps)
    res = []
    for i in range(lo.shape[0]):
        Ci = C[i].double().numpy()
        W, b = layers[-1]  # the spec folded into the last layer: C W, C b (as CROWN-IBP's IBP does)
        l, u = ibp_layers([*layers[:-1], (Ci @ W, Ci @ b)], lo[i], hi[i])[-1]
        res.append(l)
    return np.stack(res)


def backsubstitute(layers, pre, A: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """min over the box ``[lo, hi]`` of ``A @ net(x)`` by CROWN's back-substitution (Zhang et al. 2018) with the
    pre-activation bounds ``pre`` (one ``(l, u)`` per ReLU), see the module docstring."""
    bias = np.zeros(A.shape[0])
    for k in range(len(layers) - 1, -1, -1):
        W, b = layers[k]
        bias, A = bias + A @ b, A @ W
        if k == 0:
            break
        l, u = pre[k - 1]  # the ReLU before layer k acts on layer k-1's output
        active, inactive = l >= 0, u <= 0
        unstable = ~(active | inactive)
        s = np.where(active, 1.0, np.where(inactive, 0.0, u / np.where(unstable, u - l, 1.0)))
        intercept = np.where(unstable, -s * l, 0.0)
        alpha = np.where(active, 1.0, np.where(inactive, 0.0, (u > -l).astype(float)))
        pos, neg = np.clip(A, 0, None), np.clip(A, None, 0)
        bias, A = bias + neg @ intercept, pos * alpha + neg * s
    return np.clip(A, 0, None) @ lo + np.clip(A, None, 0) @ hi + bias


def crown_ibp(model: nn.Module, x: torch.Tensor, eps: float, C: torch.Tensor) -> np.ndarray:
    """CROWN-IBP lower bounds of ``C[i] @ f(x')`` (``(B, K)``), see the module docstring."""
    layers = affine_layers(model)
    lo, hi = input_box(x, eps)
    return np.stack([backsubstitute(layers, ibp_layers(layers, lo[i], hi[i]), C[i].double().numpy(), lo[i], hi[i])
                     for i in range(lo.shape[0])])


def lp(model: nn.Module, x: torch.Tensor, eps: float, C: torch.Tensor) -> np.ndarray:
    """Triangle-relaxation LP lower bounds of ``C[i] @ f(x')`` (``(B, K)``) with IBP's pre-activation bounds."""
    from scipy.optimize import linprog

    layers = affine_layers(model)
    lo, hi = input_box(x, eps)
    res = np.zeros(C.shape[:2])
    for i in range(lo.shape[0]):
        pre = ibp_layers(layers, lo[i], hi[i])
        # variables: the input z (d), then per hidden layer its pre-activation h and post-activation a
        sizes = [layers[0][0].shape[1]] + [n for k in range(len(layers) - 1) for n in (layers[k][0].shape[0],) * 2]
        offs = np.concatenate([[0], np.cumsum(sizes)])
        nvar = int(offs[-1])
        bounds = [(float(a), float(c)) for a, c in zip(lo[i], hi[i])]
        A_eq, b_eq, A_ub, b_ub = [], [], [], []
        prev = (0, sizes[0])  # (offset, size) of the previous layer's output
        for k in range(len(layers) - 1):
            W, b = layers[k]
            h0, a0 = int(offs[1 + 2 * k]), int(offs[2 + 2 * k])
            n = W.shape[0]
            l, u = pre[k]
            bounds += [(float(p), float(q)) for p, q in zip(l, u)] + [(0.0, max(float(q), 0.0)) for q in u]
            for j in range(n):  # h_j = W_j a_prev + b_j
                row = np.zeros(nvar)
                row[prev[0]:prev[0] + prev[1]] = -W[j]
                row[h0 + j] = 1.0
                A_eq.append(row)
                b_eq.append(b[j])
                if u[j] <= 0:  # inactive: a = 0 (its bounds already say so)
                    continue
                if l[j] >= 0:  # active: a = h
                    row = np.zeros(nvar)
                    row[a0 + j], row[h0 + j] = 1.0, -1.0
                    A_eq.append(row)
                    b_eq.append(0.0)
                    continue
                row = np.zeros(nvar)  # a >= h
                row[h0 + j], row[a0 + j] = 1.0, -1.0
                A_ub.append(row)
                b_ub.append(0.0)
                s = u[j] / (u[j] - l[j])  # a <= s (h - l)
                row = np.zeros(nvar)
                row[a0 + j], row[h0 + j] = 1.0, -s
                A_ub.append(row)
                b_ub.append(-s * l[j])
            prev = (a0, n)
        W, b = layers[-1]
        for r in range(C.shape[1]):
            c_row = C[i, r].double().numpy()
            obj = np.zeros(nvar)
            obj[prev[0]:prev[0] + prev[1]] = c_row @ W
            out = linprog(obj, A_ub=np.array(A_ub) if A_ub else None, b_ub=np.array(b_ub) if b_ub else None,
                          A_eq=np.array(A_eq), b_eq=np.array(b_eq), bounds=bounds, method="highs")
            assert out.status == 0, out.message
            res[i, r] = out.fun + c_row @ b
    return res
