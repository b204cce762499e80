"""Loss fusion (``datkit/certify/bounds/loss_fusion.py``): the upper bound of the robust cross-entropy with one
backward row, as certified training uses it for CROWN-IBP (``bounds.loss_fusion=true``).

- soundness: the per-example bound is >= the cross-entropy at sampled points and at PGD points maximizing the
  cross-entropy inside the box, for beta 0, 0.5 and 1, on small networks with every supported layer (BatchNorm
  in eval and train mode) and on a trained MLP;
- beta = 0 is exactly the cross-entropy of the IBP margin bounds (``robust_cross_entropy``); at eps = 0 every
  beta gives the clean cross-entropy; on an affine network (CROWN exact) beta = 1 is no looser than IBP;
- the value equals an independent float64 computation (``tests/helpers/bounds_reference.py``'s IBP and
  CROWN-IBP with the one-row specification);
- the chord factor is accurate over its whole range; at a huge eps the loss and its gradients are finite;
- the backward pass receives exactly one row (and none at beta = 0); certified training runs one IBP pass and
  gives the regularizers its intervals; the config key and its refusal with ``bounds.engine=auto_lirpa``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_bounds import every_layer_net, frozen_copy, sample_points, trained_mlp
from torch import nn

from datkit.certify.bounds import bound_state, loss_fusion, margin_bounds, spec_matrix
from datkit.certify.bounds.loss_fusion import chord_factor, fused_bound, fused_loss, logit_row
from datkit.config import ConfigError, load_config
from datkit.methods import StepInfo, create_method
from datkit.methods.certified import robust_cross_entropy
from datkit.models import Normalize, NormalizedModel, create_model
from datkit.preflight import validate_config
from helpers.runs import one_thread

TOL = 2e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, beta: float) -> torch.Tensor:
    C = spec_matrix(y, 5 if x.shape[1] == 2 else 3)
    return fused_bound(bound_state(model, x, eps, C), y, beta)


def pgd_cross_entropy(f, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 20) -> torch.Tensor:
    """PGD from a random start in the box maximizing the per-example cross-entropy; the best value seen."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    z = (x + eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
    best = torch.full((len(x),), -float("inf"))
    for _ in range(steps):
        z.requires_grad_(True)
        ce = F.cross_entropy(f(z), y, reduction="none")
        (g,) = torch.autograd.grad(ce.sum(), z)
        best = torch.maximum(best, ce.detach())
        z = torch.min(torch.max(z.detach() + 0.25 * eps * g.sign(), lo), hi)
    return torch.maximum(best, F.cross_entropy(f(z), y, reduction="none").detach())


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_bound_is_sound_at_sampled_and_attacked_points(seed: int, mode: str) -> None:
    model = every_layer_net(seed)
    model.train(mode == "train")
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(4, 2, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
    f = frozen_copy(model, x) if mode == "train" else model  # train mode: BatchNorm fixed by the clean batch
    eps = 0.02
    with torch.no_grad():
        bounds = {beta: _bounds(model, x, y, eps, beta) for beta in (0.0, 0.5, 1.0)}
        worst = torch.stack([F.cross_entropy(f(p), y, reduction="none") for p in sample_points(x, eps, 10)]).amax(0)
    worst = torch.maximum(worst, pgd_cross_entropy(f, x, y, eps))
    for beta, b in bounds.items():
        assert torch.isfinite(b).all()
        assert (b >= worst - TOL).all(), (f"beta={beta}: the bound is below a reachable cross-entropy by "
                                          f"{(worst - b).max():.3g}")


def test_fused_bound_is_sound_and_tighter_than_ibp_on_a_trained_network() -> None:
    """Where the bounds are tight (a trained MLP, small eps) soundness is a real test; CROWN-IBP's fused bound is
    below IBP's here (not a theorem for every network, but for this one it is by a wide margin)."""
    net, x, y = trained_mlp()
    for eps in (0.01, 0.05):
        with torch.no_grad():
            b = {beta: _bounds(net, x, y, eps, beta) for beta in (0.0, 0.5, 1.0)}
        worst = pgd_cross_entropy(net, x, y, eps)
        for beta, v in b.items():
            assert (v >= worst - TOL).all(), (eps, beta, v, worst)
        assert (b[1.0] <= b[0.5] + TOL).all() and (b[0.5] <= b[0.0] + TOL).all()
        assert b[1.0].sum() < b[0.0].sum()


def test_beta_zero_is_the_cross_entropy_of_the_ibp_margins() -> None:
    torch.manual_seed(0)
    net = create_model("cnn_7layer_bn", 10, 1, 8, mean=(0.3,), std=(0.4,), width=4, linear_size=16).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    for eps in (0.001, 0.05, 0.3):  # the bounds reach the thousands at 0.3 (random BatchNorm network)
        res = fused_loss(net, x, y, eps, beta=0.0, num_classes=10)
        expected = robust_cross_entropy(margin_bounds(net, x, y, eps, "ibp").lower)
        assert res.loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6)


def test_every_beta_gives_the_clean_loss_at_eps_zero_and_beta_one_beats_ibp_on_an_affine_net() -> None:
    torch.manual_seed(0)
    net = NormalizedModel(Normalize((0.3,), (0.4,)),
                          nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 3))).eval()
    x, y = torch.rand(8, 1, 4, 4), torch.randint(0, 3, (8,))
    clean = F.cross_entropy(net(x), y, reduction="none")
    for beta in (0.0, 0.3, 1.0):
        torch.testing.assert_close(_bounds(net, x, y, 0.0, beta), clean, rtol=1e-5, atol=1e-5)
    # CROWN is exact on an affine network: the max of the summed chord <= the sum of its maxima (IBP's bound)
    worst = pgd_cross_entropy(net, x, y, 0.1)
    b1, b0 = _bounds(net, x, y, 0.1, 1.0), _bounds(net, x, y, 0.1, 0.0)
    assert (worst - TOL <= b1).all() and (b1 <= b0 + 1e-5).all()


def test_matches_an_independent_float64_computation() -> None:
    """IBP bounds of the margins and the CROWN-IBP upper bound of the one row, from ``bounds_reference`` (which
    ``tests/test_bounds.py`` checks against an LP), assembled in float64 without the numerical rewrites."""
    from helpers import bounds_reference as ref

    net, x, y = trained_mlp()
    eps, beta = 0.05, 0.7
    C = spec_matrix(y, 3)
    margin_lo, margin_hi = ref.ibp(net, x, eps, C), -ref.ibp(net, x, eps, -C)
    u, l = torch.from_numpy(-margin_lo), torch.from_numpy(-margin_hi)
    a = (u.exp() - l.exp()) / (u - l)
    A = logit_row(a.float(), y, 3)
    lin = torch.from_numpy(-ref.crown_ibp(net, x, eps, -A)).squeeze(1)
    ub_crown = 1 + (l.exp() - a * l).sum(1) + lin
    ub_ibp = 1 + u.exp().sum(1)
    expected = torch.log(beta * ub_crown + (1 - beta) * ub_ibp)
    with torch.no_grad():
        got = _bounds(net, x, y, eps, beta)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_chord_factor_is_accurate_everywhere() -> None:
    w = torch.tensor([0.0, 1e-9, 1e-6, 9.9e-4, 1e-3, 1.1e-3, 0.1, 1.0, 20.0, 1e3, 1e6], dtype=torch.float64)
    exact = torch.where(w > 0, -torch.expm1(-w) / w, torch.ones_like(w))
    torch.testing.assert_close(chord_factor(w.float()).double(), exact, rtol=1e-6, atol=0)
    wg = w.float().requires_grad_(True)
    chord_factor(wg).sum().backward()
    assert torch.isfinite(wg.grad).all() and wg.grad[0].item() == pytest.approx(-0.5)
    # the chord it gives lies above exp on the interval (scaled by exp(-u)): exp(d - u) <= 1 + f(w) w (d - u) / w
    lo, hi = torch.tensor([-30.0, -1.0, 0.4999, 2.0]), torch.tensor([5.0, -0.9, 0.5, 2.0])
    a = chord_factor(hi - lo)
    for t in torch.linspace(0, 1, 21):
        d = lo + t * (hi - lo)
        assert (torch.exp(d - hi) <= 1 + a * (d - hi) + 1e-6).all()


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_loss_and_gradients_are_finite_at_huge_eps(beta: float) -> None:
    torch.manual_seed(0)
    net = create_model("cnn_7layer_bn", 10, 1, 8, mean=(0.3,), std=(0.4,), width=4, linear_size=16).train()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3.0)  # bounds in the tens of thousands: exp would overflow without the log-domain scaling
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    loss = fused_loss(net, x, y, 1.0, beta=beta, num_classes=10).loss
    assert torch.isfinite(loss) and loss.item() > 1e3
    loss.backward()
    bad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, bad


def test_the_backward_pass_gets_one_row(monkeypatch) -> None:
    shapes = []
    real = loss_fusion.backward_pass

    def spy(state, A):
        shapes.append(tuple(A.shape))
        return real(state, A)

    monkeypatch.setattr(loss_fusion, "backward_pass", spy)
    torch.manual_seed(0)
    net = create_model("cnn_7layer_bn", 10, 1, 8, mean=(0.3,), std=(0.4,), width=4, linear_size=16).train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    fused_loss(net, x, y, 0.05, beta=0.5, num_classes=10)
    assert shapes == [(16, 1, 10)]
    fused_loss(net, x, y, 0.05, beta=0.0, num_classes=10)
    assert shapes == [(16, 1, 10)], "beta = 0 needs no backward pass"


# --- certified training ----------------------------------------------------------------------------

def _method(*extra: str):
    cfg = load_config(None, ["method.name=crown-ibp", "data.name=digits", "attack.eps=0.2", *extra])
    torch.manual_seed(0)
    net = create_model("cnn_7layer_bn", 10, 1, 8, mean=(0.3,), std=(0.4,), width=4, linear_size=16)
    m = create_method(cfg)
    m.prepare_model(net)
    net.train()
    g = torch.Generator().manual_seed(1)
    return cfg, m, net, torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_crown_ibp_training_uses_the_fused_loss_with_one_ibp_pass_and_the_regularizers(monkeypatch) -> None:
    from datkit.certify.bounds import api
    from datkit.certify.regularizers import warmup_regularizer

    cfg, m, net, x, y = _method("bounds.reg_lambda=0")
    assert cfg.bounds.loss_fusion is True, "loss fusion is the default"
    expected = fused_loss(net, x, y, 0.05, beta=0.75, num_classes=10).loss  # beta = 1 - 0.05 / 0.2
    assert m.loss(net, net, x, y, StepInfo(eps=0.05)).item() == pytest.approx(expected.item(), rel=1e-5)
    _, m_off, *_ = _method("bounds.reg_lambda=0", "bounds.loss_fusion=false")
    margins = margin_bounds(net, x, y, 0.05, "crown-ibp", beta=0.75)
    assert (m_off.loss(net, net, x, y, StepInfo(eps=0.05)).item()
            == pytest.approx(robust_cross_entropy(margins.lower).item(), rel=1e-5))
    # the regularizers read the intervals of the same (single) IBP pass
    _, m_reg, *_ = _method("bounds.reg_lambda=0.5")
    calls = []
    real = api.ibp_pass
    monkeypatch.setattr(api, "ibp_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss = m_reg.loss(net, net, x, y, StepInfo(eps=0.05))
    assert len(calls) == 1
    state = margins.state
    reg = warmup_regularizer(state.relu_inputs(), state.network_input(), cfg.bounds.reg_tol, cfg.bounds.reg_terms)
    assert loss.item() == pytest.approx(expected.item() + 0.5 * 0.75 * reg.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_loss_fusion_is_refused_with_the_auto_lirpa_engine() -> None:
    msg = "bounds.loss_fusion"
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
        validate_config(load_config(None, ["method.name=crown-ibp", "bounds.engine=auto_lirpa"]))
    for ok in (["method.name=crown-ibp", "bounds.engine=auto_lirpa", "bounds.loss_fusion=false"],
               ["method.name=ibp", "bounds.engine=auto_lirpa"]):
        try:
            validate_config(load_config(None, ok))
        except ConfigError as err:  # auto_LiRPA is not installed here: only that may be reported
            assert msg not in str(err), err
    validate_config(load_config(None, ["method.name=crown-ibp", "bounds.loss_fusion=false"]))


def test_relu_backward_step_equals_the_composed_ops_in_value_and_gradient() -> None:
    """The ReLU rule's single autograd node (hand-written gradient) against the relaxation composed from torch ops."""
    from datkit.certify.bounds import Interval
    from datkit.certify.bounds.rules_relu import ReLUBackwardStep, relu_relaxation

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(2, 3, 4, generator=g, dtype=torch.float64),
            torch.randn(2, 3, 4, generator=g, dtype=torch.float64))
    l, u = torch.minimum(a, b).requires_grad_(True), torch.maximum(a, b).requires_grad_(True)
    with torch.no_grad():  # active, inactive, and exactly-zero neurons next to the unstable ones
        l[0, 0], u[0, 0] = 0.5, 1.0
        l[0, 1], u[0, 1] = -1.0, -0.5
    for rows in (1, 3):
        A = torch.randn(2, rows, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)

        def composed(A, l, u):
            lower, slope, intercept = (t.unsqueeze(1) for t in relu_relaxation(Interval(l, u)))
            pos, neg = A.clamp(min=0), A.clamp(max=0)
            return pos * lower + neg * slope, (neg * intercept).flatten(2).sum(-1)

        def fused(A, l, u):
            lower = ((l + u) > 0).to(l.dtype).detach()
            return ReLUBackwardStep.apply(A, l, torch.relu(u), lower)

        for x, y in zip(fused(A, l, u), composed(A, l, u)):
            torch.testing.assert_close(x, y)
        assert torch.autograd.gradcheck(fused, (A, l, u))
        gf = torch.autograd.grad(sum(t.sum() * w for t, w in zip(fused(A, l, u), (1.0, 0.7))), (A, l, u))
        gc = torch.autograd.grad(sum(t.sum() * w for t, w in zip(composed(A, l, u), (1.0, 0.7))), (A, l, u))
        for x, y in zip(gf, gc):
            torch.testing.assert_close(x, y)
