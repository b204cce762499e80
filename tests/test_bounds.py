"""Soundness and exactness of datkit's bound engine (IBP and CROWN-IBP).

- random small networks with every supported layer (in-model normalization, Conv2d with stride /
  groups / dilation, BatchNorm2d/1d in eval and train mode, ReLU as module / F.relu / torch.relu,
  AvgPool2d, AdaptiveAvgPool2d, identity and convolutional residual shortcuts, Flatten and
  ``x.view(x.size(0), -1)``, Linear, Identity, eval-mode Dropout): sampled points and PGD-attacked points
  never leave [lb, ub], for IBP and for CROWN-IBP, for the logits and for the margins;
- with eps = 0 the bounds equal the forward pass;
- on a single linear layer both engines give the exact bounds (attained at a vertex of the box);
- a layer without a rule fails with a message naming it;
- on a small trained ReLU network, against computations that do not use the engine
  (``tests/helpers/bounds_reference.py``): IBP and CROWN-IBP equal a from-scratch interval / back-substitution
  implementation, the LP of the triangle relaxation (scipy's ``linprog``, same IBP pre-activation bounds) is
  >= both, every sampled / attacked point is >= the LP, and CROWN-IBP is strictly tighter than IBP.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from datkit.certify import crown_ibp_bounds, ibp_bounds
from datkit.certify.bounds import UnsupportedLayer, clean_batch_stats, margin_bounds, spec_matrix, supported_layers
from datkit.models import Normalize, NormalizedModel
from helpers.runs import one_thread

TOL = 1e-4  # float32 rounding of a few hundred multiply-adds, relative to O(1) outputs
CLASSES = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


class Residual(nn.Module):
    """relu(conv2(relu(bn(conv1(x)))) + shortcut(x)); the shortcut is the identity or a 1x1 convolution."""

    def __init__(self, c: int, conv_shortcut: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.shortcut = nn.Conv2d(c, c, 1) if conv_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.bn(self.conv1(x))))
        out += self.shortcut(x)
        return F.relu(out)


class ViewFlatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


def every_layer_net(seed: int, in_channels: int = 2) -> NormalizedModel:
    """A small random network using every layer type with a bound rule, with random BatchNorm statistics."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        Residual(4, conv_shortcut=False), Residual(4, conv_shortcut=True),
        nn.AvgPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), ViewFlatten(),
        nn.Linear(24, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3), nn.Identity(),
        nn.Linear(12, 8), nn.ReLU(), nn.Flatten(), nn.Linear(8, CLASSES),
    )
    for m in net.modules():
        if isinstance(m, _BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)  # negative scales too
                m.bias.uniform_(-0.5, 0.5)
    return NormalizedModel(Normalize((0.3, 0.6), (0.4, 0.2), in_channels=in_channels), net)


def frozen_copy(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """An eval-mode copy whose BatchNorm layers normalize with the clean batch statistics of ``x``: the
    function that train-mode bounds bound (BatchNorm fixed by the clean batch)."""
    stats = clean_batch_stats(model, x)
    frozen = copy.deepcopy(model).eval()
    for (_name, m), (_, f) in zip(model.named_modules(), frozen.named_modules()):
        if m in stats:
            f.running_mean.data.copy_(stats[m][0].detach())
            f.running_var.data.copy_(stats[m][1].detach())
    return frozen


def sample_points(x: torch.Tensor, eps: float, n: int) -> list[torch.Tensor]:
    """Uniform points and box vertices of ``{|x' - x| <= eps} ∩ [0, 1]``."""
    pts = [(x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1) for _ in range(n)]
    pts += [(x + eps * torch.sign(torch.randn_like(x))).clamp(0, 1) for _ in range(n)]
    return pts


def pgd_extremes(f, x: torch.Tensor, eps: float, outputs: int, steps: int = 10) -> list[torch.Tensor]:
    """For each output j and sign s, PGD from x maximizing s * f(x')[:, j] within the box: the points whose
    outputs come closest to the bounds."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    points = []
    for j in range(outputs):
        for s in (1.0, -1.0):
            z = (x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
            for _ in range(steps):
                z.requires_grad_(True)
                (g,) = torch.autograd.grad((s * f(z)[:, j]).sum(), z)
                z = torch.min(torch.max(z.detach() + 0.5 * eps * g.sign(), lo), hi)
            points.append(z.detach())
    return points


def assert_inside(values: torch.Tensor, lb: torch.Tensor, ub: torch.Tensor, what: str) -> None:
    below, above = (lb - values).max().item(), (values - ub).max().item()
    assert below <= TOL and above <= TOL, f"{what}: a point leaves [lb, ub] by {max(below, above):.3g}"


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_and_attacked_points_stay_within_bounds(seed: int, mode: str) -> None:
    model = every_layer_net(seed)
    model.train(mode == "train")
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()  # a dropout mask is not a function of the input; bounds need it off
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(6, 2, 12, 12, generator=g), torch.randint(0, CLASSES, (6,), generator=g)
    eps = 0.03 if seed % 2 == 0 else 0.004  # a small eps keeps the bounds close to the attained values
    f = frozen_copy(model, x) if mode == "train" else model
    C = spec_matrix(y, CLASSES)
    margin = lambda z: (C @ f(z).unsqueeze(-1)).squeeze(-1)  # noqa: E731
    with torch.no_grad():
        bounds = {"IBP": ibp_bounds(model, x, eps), "CROWN-IBP": crown_ibp_bounds(model, x, eps),
                  "IBP margins": ibp_bounds(model, x, eps, C), "CROWN-IBP margins": crown_ibp_bounds(model, x, eps, C)}
    points = sample_points(x, eps, 10) + pgd_extremes(f, x, eps, CLASSES) + pgd_extremes(margin, x, eps, CLASSES - 1)
    for name, (lb, ub) in bounds.items():
        assert lb.shape == ub.shape and bool((lb <= ub + TOL).all()), name
        for z in points:
            with torch.no_grad():
                out = margin(z) if "margins" in name else f(z)
            assert_inside(out, lb, ub, f"{name} ({mode} mode, seed {seed})")
    # the bounds are not vacuous: the attacks reach well inside the interval's width
    lb, ub = bounds["IBP"]
    assert torch.isfinite(lb).all() and torch.isfinite(ub).all()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_eps_zero_bounds_equal_the_forward_pass(mode: str) -> None:
    model = every_layer_net(3).train(mode == "train")
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    x = torch.rand(5, 2, 12, 12)
    with torch.no_grad():
        out = frozen_copy(model, x)(x) if mode == "train" else model(x)
        for name, (lb, ub) in {"IBP": ibp_bounds(model, x, 0.0), "CROWN-IBP": crown_ibp_bounds(model, x, 0.0)}.items():
            torch.testing.assert_close(lb, out, rtol=0, atol=1e-5, msg=f"{name} lower at eps=0")
            torch.testing.assert_close(ub, out, rtol=0, atol=1e-5, msg=f"{name} upper at eps=0")
    if mode == "train":  # the train-mode forward pass itself (batch statistics) gives the same logits
        with torch.no_grad():
            torch.testing.assert_close(ibp_bounds(model, x, 0.0)[0], model(x), rtol=0, atol=1e-5)


def test_single_linear_layer_bounds_are_exact() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(7, 4)
    model = NormalizedModel(Normalize((0.5,), (0.25,)), nn.Sequential(nn.Flatten(), lin)).eval()
    x, eps = torch.rand(3, 1, 7, 1), 0.2
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    y = torch.tensor([0, 2, 3])
    C = spec_matrix(y, 4)
    W_eff = C @ lin.weight  # the margins are linear too: exact bounds of C f as well
    for rows, fn in ((torch.eye(4).expand(3, 4, 4), lambda z: model(z)),
                     (C, lambda z: (C @ model(z).unsqueeze(-1)).squeeze(-1))):
        W = rows @ lin.weight  # (B, K, 7) in normalized units; std > 0 keeps the signs in pixel units
        # the minimizing / maximizing vertex of the box for every row
        lo_vertex = torch.where(W > 0, lo.view(3, 1, 7), hi.view(3, 1, 7))
        hi_vertex = torch.where(W > 0, hi.view(3, 1, 7), lo.view(3, 1, 7))
        with torch.no_grad():
            exact_lo = torch.stack([fn(lo_vertex[:, k].view(3, 1, 7, 1))[:, k] for k in range(W.shape[1])], 1)
            exact_hi = torch.stack([fn(hi_vertex[:, k].view(3, 1, 7, 1))[:, k] for k in range(W.shape[1])], 1)
            spec = None if rows.shape[1] == 4 and torch.equal(rows, torch.eye(4).expand(3, 4, 4)) else rows
            for name, (lb, ub) in {"IBP": ibp_bounds(model, x, eps, spec),
                                   "CROWN-IBP": crown_ibp_bounds(model, x, eps, spec)}.items():
                torch.testing.assert_close(lb, exact_lo, rtol=0, atol=1e-5, msg=f"{name}: lower bound not exact")
                torch.testing.assert_close(ub, exact_hi, rtol=0, atol=1e-5, msg=f"{name}: upper bound not exact")
    assert W_eff.shape == (3, 3, 7)


def trained_mlp(seed: int = 0, steps: int = 30) -> tuple[NormalizedModel, torch.Tensor, torch.Tensor]:
    """A 16-24-24-3 ReLU network trained ``steps`` full-batch Adam steps on 3 Gaussian clusters (it fits them), and
    6 of its training points with their labels."""
    torch.manual_seed(seed)
    net = NormalizedModel(Normalize((0.3,), (0.4,)), nn.Sequential(
        nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 3)))
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(3, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (256,), generator=g)
    x = (centers[y] + 0.15 * torch.randn(256, 1, 4, 4, generator=g)).clamp(0, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert (net(x).argmax(1) == y).float().mean() > 0.95, "the network did not fit its clusters"
    return net.eval(), x[:6], y[:6]


def test_crown_ibp_against_an_independent_lp_on_a_trained_network() -> None:
    from helpers import bounds_reference as ref

    net, x, y = trained_mlp()
    eps = 0.03
    C = spec_matrix(y, 3)
    with torch.no_grad():
        ibp = ibp_bounds(net, x, eps, C)[0].double().numpy()
        crown = crown_ibp_bounds(net, x, eps, C)[0].double().numpy()
        crown_margins = margin_bounds(net, x, y, eps, "crown-ibp", beta=1.0).lower.double().numpy()
    lp = ref.lp(net, x, eps, C)
    # the engine = a from-scratch implementation of the same algorithms (float32 vs float64)
    assert abs(ibp - ref.ibp(net, x, eps, C)).max() < 1e-4
    assert abs(crown - ref.crown_ibp(net, x, eps, C)).max() < 1e-4
    assert abs(crown_margins - crown).max() < 1e-5
    # the LP with the same IBP pre-activation bounds is the tightest linear relaxation: >= IBP and >= CROWN-IBP
    assert (lp - ibp).min() >= -1e-4 and (lp - crown).min() >= -1e-4, ((lp - ibp).min(), (lp - crown).min())
    # ... and still a lower bound of the network: every sampled or attacked point's margin is above it
    margin = lambda z: (C @ net(z).unsqueeze(-1)).squeeze(-1)  # noqa: E731
    points = sample_points(x, eps, 50) + pgd_extremes(margin, x, eps, 2, steps=20)
    with torch.no_grad():
        attained = torch.stack([margin(z) for z in points]).amin(0).double().numpy()
    assert (attained - lp).min() >= -1e-4, (attained - lp).min()
    # strictly tighter than IBP on this trained network: every margin, by 3.3 on average here (IBP's bound is
    # 2.5-6 below it); CROWN-IBP returning IBP's bounds fails this
    assert (crown - ibp).min() > 0.1 and (crown - ibp).mean() > 1.0, (crown - ibp)


def test_margin_bounds_mix_and_gradients() -> None:
    model = every_layer_net(4).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    x, y = torch.rand(4, 2, 12, 12), torch.randint(0, CLASSES, (4,))
    ibp = margin_bounds(model, x, y, 0.02, "ibp").lower
    crown = margin_bounds(model, x, y, 0.02, "crown-ibp", beta=1.0).lower
    mixed = margin_bounds(model, x, y, 0.02, "crown-ibp", beta=0.25).lower
    torch.testing.assert_close(mixed, 0.25 * crown + 0.75 * ibp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(margin_bounds(model, x, y, 0.02, "crown-ibp", beta=0.0).lower, ibp)
    mixed.sum().backward()  # gradients reach every parameter, through the batch statistics too
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_train_mode_bounds_leave_running_statistics_alone() -> None:
    model = every_layer_net(5).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ibp_bounds(model, torch.rand(4, 2, 12, 12), 0.01)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


class _WithMaxPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class _WithSigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x).flatten(1)


@pytest.mark.parametrize("net, name", [(_WithMaxPool(), "MaxPool2d"), (_WithSigmoid(), "sigmoid"),
                                       (nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.Tanh()), "Tanh")])
def test_unsupported_layer_is_named(net: nn.Module, name: str) -> None:
    model = NormalizedModel(Normalize(), net).eval()
    with pytest.raises(UnsupportedLayer, match=name) as exc:
        ibp_bounds(model, torch.rand(2, 2, 2, 2), 0.1)
    assert "supported:" in str(exc.value) and "Conv2d" in str(exc.value)


def test_training_mode_dropout_is_refused() -> None:
    model = NormalizedModel(Normalize(), nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Dropout(0.5))).train()
    with pytest.raises(UnsupportedLayer, match="Dropout"):
        ibp_bounds(model, torch.rand(2, 1, 2, 2), 0.1)


def test_supported_layers_lists_the_required_ones() -> None:
    names = set(supported_layers())
    assert {"Linear", "Conv2d", "_BatchNorm", "ReLU", "Flatten", "AvgPool2d", "AdaptiveAvgPool2d", "Identity",
            "Normalize", "add"} <= names


def test_relu_relaxation_is_valid_and_tight_at_the_ends() -> None:
    """alpha*h <= relu(h) <= upper_slope*h + intercept on [l, u], with equality of the upper line at l and u."""
    from datkit.certify.bounds import Interval
    from datkit.certify.bounds.rules_relu import relu_relaxation

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, generator=g), torch.randn(2000, generator=g)
    iv = Interval(torch.minimum(a, b), torch.maximum(a, b))
    lower_slope, upper_slope, intercept = relu_relaxation(iv)
    assert set(lower_slope.unique().tolist()) <= {0.0, 1.0}
    for t in torch.linspace(0, 1, 11):
        h = iv.lower + t * (iv.upper - iv.lower)
        assert bool((lower_slope * h <= h.clamp(min=0) + 1e-6).all())
        assert bool((h.clamp(min=0) <= upper_slope * h + intercept + 1e-6).all())
    for h in iv:  # the upper line touches relu at both ends of the interval
        torch.testing.assert_close(upper_slope * h + intercept, h.clamp(min=0), rtol=0, atol=1e-5)
