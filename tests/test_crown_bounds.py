"""Full CROWN bounds (``datkit.certify.crown_bounds``): sound for every supported layer, equal to an independent
dense implementation (MLP from its weight matrices, conv net from its convolutions' Jacobians), never looser than
CROWN-IBP and strictly tighter on a random net (the intermediate refinement does something).

The independent reference (below and ``tests/helpers/bounds_reference.py``'s back-substitution, numpy float64, written
from Zhang et al. 2018, not calling the engine) uses the
same choices as the engine: adaptive lower slope (1 if u > -l else 0), each pre-activation's CROWN bounds
intersected with its IBP interval (IBP from the input box), and the final bound's max with CROWN-IBP.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_bounds import Residual, ViewFlatten, pgd_extremes, sample_points
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from datkit.certify import crown_bounds, crown_ibp_bounds
from datkit.certify.bounds import spec_matrix, verified
from datkit.models import Normalize, NormalizedModel
from helpers.bounds_reference import backsubstitute, ibp_layers
from helpers.runs import one_thread

CLASSES = 4
TOL = 1e-9  # float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


class FunctionalReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(18, 10), nn.Linear(10, 10), nn.Linear(10, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(F.relu(self.a(x.flatten(1))))))


def _head(n: int) -> list[nn.Module]:
    return [nn.Flatten(), nn.Linear(n, 10), nn.ReLU(), nn.Linear(10, CLASSES)]


# one small model per layer type (inputs (2, 3, 3) or (2, 6, 6)); each has >= 2 ReLU layers
LAYERS = {
    "linear": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(18, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(),
                                     nn.Linear(10, CLASSES)), 3),
    "conv": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                                   nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), nn.ReLU(), *_head(36)), 6),
    "normalize": (lambda: NormalizedModel(Normalize((0.3, 0.6), (0.4, 0.2), in_channels=2), nn.Sequential(
        nn.Flatten(), nn.Linear(18, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, CLASSES))), 3),
    "avgpool": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), *_head(36)), 6),
    "adaptive_avgpool": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                               *_head(16)), 6),
    "batchnorm2d": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), *_head(144)), 6),
    "batchnorm1d": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(18, 10), nn.BatchNorm1d(10), nn.ReLU(),
                                          nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, CLASSES)), 3),
    "functional_relu": (FunctionalReLU, 3),
    "view": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), ViewFlatten(), nn.Linear(48, 10), nn.ReLU(),
                                   nn.Linear(10, CLASSES)), 6),
    "dropout_identity": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(18, 10), nn.ReLU(), nn.Dropout(0.5),
                                               nn.Identity(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, CLASSES)), 3),
    "residual": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), Residual(4, conv_shortcut=False),
                                       Residual(4, conv_shortcut=True), *_head(144)), 6),
}


def layer_net(kind: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The eval-mode float64 model of ``kind`` (random BatchNorm statistics) and 3 inputs."""
    torch.manual_seed(seed)
    make, side = LAYERS[kind]
    net = make()
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.double().eval(), torch.rand(3, 2, side, side, dtype=torch.float64)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_crown_is_sound_and_no_looser_than_crown_ibp_for_every_layer(kind: str) -> None:
    net, x = layer_net(kind)
    eps = 0.05
    y = torch.arange(len(x)) % CLASSES
    C = spec_matrix(y, CLASSES).double()
    margin = lambda z: (C @ net(z).unsqueeze(-1)).squeeze(-1)  # noqa: E731
    with torch.no_grad():
        bounds = {"logits": (crown_bounds(net, x, eps), crown_ibp_bounds(net, x, eps)),
                  "margins": (crown_bounds(net, x, eps, C), crown_ibp_bounds(net, x, eps, C))}
    points = (sample_points(x, eps, 20) + pgd_extremes(net, x, eps, CLASSES, steps=5)
              + pgd_extremes(margin, x, eps, CLASSES - 1, steps=5))
    for what, ((lb, ub), (lb_ci, ub_ci)) in bounds.items():
        assert (lb >= lb_ci - TOL).all() and (ub <= ub_ci + TOL).all(), f"{kind}: looser than CROWN-IBP ({what})"
        for z in points:
            with torch.no_grad():
                out = margin(z) if what == "margins" else net(z)
            gap = max((lb - out).max().item(), (out - ub).max().item())
            assert gap <= 1e-9, f"{kind} ({what}): a point leaves [lb, ub] by {gap:.3g}"
    with torch.no_grad():
        lb, ub = crown_bounds(net, x, eps, C, upper=False)
    assert ub is None
    torch.testing.assert_close(lb, bounds["margins"][0][0], rtol=0, atol=1e-12)


# --- the independent reference ---------------------------------------------------------------------

def dense_layers(net: nn.Module, pieces: list[nn.Module],
                 in_shape: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each affine piece as a dense ``(W, b)`` (its Jacobian at 0 and its value at 0); ReLU between pieces."""
    layers, shape = [], in_shape
    for piece in pieces:
        z = torch.zeros(1, *shape, dtype=torch.float64)
        out = piece(z)
        J = torch.autograd.functional.jacobian(lambda t, piece=piece, shape=shape: piece(t.view(1, *shape)).flatten(),
                                               z.flatten())
        layers.append((J.detach().numpy(), out.detach().flatten().numpy()))
        shape = tuple(out.shape[1:])
    return layers


def reference_crown(layers, lo: np.ndarray, hi: np.ndarray, C: np.ndarray) -> np.ndarray:
    """Full CROWN lower bound of ``C @ net`` for one input box (see the module docstring)."""
    ibp = ibp_layers(layers, lo, hi)[:-1]  # the pre-activations' IBP intervals
    pre = []
    for k, (l_ibp, u_ibp) in enumerate(ibp):
        eye = np.eye(len(l_ibp))
        l_cr, u_cr = (backsubstitute(layers[: k + 1], pre, eye, lo, hi),
                      -backsubstitute(layers[: k + 1], pre, -eye, lo, hi))
        pre.append((np.maximum(l_ibp, l_cr), np.minimum(u_ibp, u_cr)))
    return np.maximum(backsubstitute(layers, pre, C, lo, hi), backsubstitute(layers, ibp, C, lo, hi))


def _compare(net: nn.Module, layers, x: torch.Tensor, eps: float) -> float:
    y = torch.arange(len(x)) % CLASSES
    C = spec_matrix(y, CLASSES).double()
    with torch.no_grad():
        got = crown_bounds(net, x, eps, C, max_rows=7)[0].numpy()  # a small max_rows: several chunks per layer
    lo, hi = (x - eps).clamp(0, 1).flatten(1).numpy(), (x + eps).clamp(0, 1).flatten(1).numpy()
    want = np.stack([reference_crown(layers, lo[i], hi[i], C[i].numpy()) for i in range(len(x))])
    return float(abs(got - want).max())


def test_equals_a_dense_reference_on_an_mlp() -> None:
    from helpers.bounds_reference import affine_layers

    torch.manual_seed(1)
    net = NormalizedModel(Normalize((0.3,), (0.4,)), nn.Sequential(
        nn.Flatten(), nn.Linear(16, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(),
        nn.Linear(16, CLASSES))).double().eval()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    assert _compare(net, affine_layers(net), x, 0.08) < 1e-6


def test_equals_a_dense_reference_on_a_conv_net() -> None:
    torch.manual_seed(2)
    c1, c2 = nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
    lin1, lin2 = nn.Linear(36, 12), nn.Linear(12, CLASSES)
    net = nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), nn.Flatten(), lin1, nn.ReLU(), lin2).double().eval()
    layers = dense_layers(net, [c1, c2, nn.Sequential(nn.Flatten(), lin1), lin2], (2, 6, 6))
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64)
    assert _compare(net, layers, x, 0.05) < 1e-6


def test_strictly_tighter_than_crown_ibp_on_a_random_net() -> None:
    net, x = layer_net("linear", seed=3)
    with torch.no_grad():
        (lb, ub), (lb_ci, ub_ci) = crown_bounds(net, x, 0.1), crown_ibp_bounds(net, x, 0.1)
    assert (lb - lb_ci).min() >= -TOL and (ub_ci - ub).min() >= -TOL
    assert (lb - lb_ci).max() > 1e-2 and (ub_ci - ub).max() > 1e-2, "the intermediate refinement did nothing"


def test_verified_accepts_crown() -> None:
    net, x = layer_net("linear", seed=4)
    y = net(x).argmax(1)
    got = {m: verified(net, x, y, 0.02, m) for m in ("ibp", "crown-ibp", "crown")}
    assert bool((got["crown"] >= got["crown-ibp"]).all()) and bool((got["crown-ibp"] >= got["ibp"]).all())
    with pytest.raises(ValueError, match="crown"):
        verified(net, x, y, 0.02, "alpha-crown")
