"""Certified training (methods ibp / crown-ibp): eps schedules, IBP initialization, warm-up regularizers,
the losses, verified accuracy, the config checks and a tiny end-to-end run with VA / VE in the results."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datkit.certify.bounds import Interval, bound_state, spec_matrix
from datkit.certify.ibp_init import ibp_init, ibp_init_std
from datkit.certify.regularizers import relu_balance_loss, tightness_loss, warmup_regularizer
from datkit.certify.schedules import eps_schedule, smoothed_fraction
from datkit.config import ConfigError, load_config
from datkit.methods import StepInfo, create_method
from datkit.methods.certified import VerifiedAccuracy, robust_cross_entropy
from datkit.models import create_model
from datkit.preflight import validate_config
from helpers.runs import one_thread, train_inprocess


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


# --- eps schedules -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "smoothed"])
def test_schedule_endpoints_and_monotone(name: str) -> None:
    eps = [eps_schedule(name, 0.4, 2.0, 10.0, t / 10) for t in range(150)]
    assert all(e == 0.0 for e in eps[:21]), "eps must be 0 for the first `start` epochs"
    assert eps[120] == pytest.approx(0.4) and eps[-1] == pytest.approx(0.4)
    assert all(b >= a - 1e-12 for a, b in zip(eps, eps[1:]))
    assert eps_schedule(name, 0.4, 2.0, 0.0, 2.0) == 0.4  # no ramp: eps_max from `start` on


def test_linear_schedule_values_and_smoothed_shape() -> None:
    assert eps_schedule("linear", 0.3, 1.0, 4.0, 2.0) == pytest.approx(0.075)
    # smoothed: slower than linear early, continuous in value and slope at mid = 0.25
    assert smoothed_fraction(0.1) < 0.1
    h = 1e-6
    left = (smoothed_fraction(0.25) - smoothed_fraction(0.25 - h)) / h
    right = (smoothed_fraction(0.25 + h) - smoothed_fraction(0.25)) / h
    assert left == pytest.approx(right, rel=1e-3)
    assert smoothed_fraction(0.0) == 0.0 and smoothed_fraction(1.0) == pytest.approx(1.0)


# --- IBP initialization ----------------------------------------------------------------------------

def test_ibp_init_std_last_layer_and_residual_halving() -> None:
    torch.manual_seed(0)
    model = create_model("wide_resnet_8", 10, 3, 16, widen_factor=2)
    last = model.net.head[-1].weight.detach().clone()
    changed = ibp_init(model)
    assert ("net.head.4" not in changed
            and torch.equal(model.net.head[-1].weight, last)), "the classifier must keep its init"
    conv = model.net.layers[0].conv2  # its input is a ReLU of a conv branch: plain IBP init
    assert conv.weight.std().item() == pytest.approx(ibp_init_std(conv), rel=0.1)
    # the first conv of block 2 reads relu(block-1 sum): halved; so is that block's shortcut conv
    for layer in (model.net.layers[1].conv1, model.net.layers[1].shortcut[0]):
        assert layer.weight.std().item() == pytest.approx(ibp_init_std(layer) / 2, rel=0.1)
    assert ibp_init_std(conv) == pytest.approx(math.sqrt(2 * math.pi) / (conv.in_channels * 9))


def test_ibp_init_keeps_bounds_from_exploding() -> None:
    """Shi et al.'s Fig. 1: without BatchNorm, the bound width grows layer by layer with the default init
    and stays flat with the IBP initialization."""
    growth = {}
    for init in ("default", "ibp"):
        torch.manual_seed(0)
        model = create_model("cnn_small", 10, 1, 28).eval()
        if init == "ibp":
            ibp_init(model)
        with torch.no_grad():
            state = bound_state(model, torch.rand(16, 1, 28, 28), 0.01)
        r0 = state.network_input().radius.mean()
        growth[init] = [(iv.radius.mean() / r0).item() for iv in state.relu_inputs()]
    assert max(growth["ibp"]) < 4 and min(growth["ibp"]) > 0.25, growth
    assert growth["default"][-1] > 10 * growth["ibp"][-1], growth


# --- regularizers ---------------------------------------------------------------------------------

def test_tightness_regularizer_values() -> None:
    box = Interval(torch.full((2, 3), -1.0), torch.full((2, 3), 1.0))  # radius 1
    same = Interval(torch.full((2, 4), -1.0), torch.full((2, 4), 1.0))
    wide = Interval(torch.full((2, 4), -4.0), torch.full((2, 4), 4.0))  # 4x the input's radius
    assert tightness_loss([same], box, 0.5).item() == pytest.approx(0.0)
    assert tightness_loss([wide], box, 0.5).item() == pytest.approx((0.5 - 0.25) / 0.5)
    assert tightness_loss([same, wide], box, 0.5).item() == pytest.approx(0.25)


def test_relu_balance_regularizer_values() -> None:
    # symmetric: as many active as inactive neurons with mirrored centers -> both ratios 1 -> no penalty
    sym = Interval(torch.tensor([[1.0, -3.0]]), torch.tensor([[3.0, -1.0]]))
    assert relu_balance_loss([sym], 0.5).item() == pytest.approx(0.0, abs=1e-6)
    # inactive neurons dominate (mean ratio 1/4, variance ratio < 1/2): penalized
    skew = Interval(torch.tensor([[0.5, -5.0, -9.0]]), torch.tensor([[1.5, -3.0, -7.0]]))
    assert relu_balance_loss([skew], 0.5).item() > 0.4
    box = Interval(torch.zeros(1, 2), torch.ones(1, 2))
    assert warmup_regularizer([], box, 0.5).item() == 0.0


def _balance_sums_composed(c: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The sums of ``BalanceSums`` from plain torch ops (the regularizer's formula before the fused node)."""
    active, inactive = (lower > 0).to(c.dtype), (upper < 0).to(c.dtype)
    delta = (c - c.mean()).square()
    return torch.stack([torch.stack([(c * active).sum(), (c * inactive).sum()]),
                        torch.stack([(delta * active).sum(), (delta * inactive).sum()])])


def test_balance_sums_node_equals_the_composed_formula_in_value_and_gradient() -> None:
    from datkit.certify.regularizers import balance_sums

    g = torch.Generator().manual_seed(0)
    c = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) + 0.3).requires_grad_()
    r = torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64)
    iv = Interval.from_center_radius(c, r)
    fused, _ = balance_sums(iv)
    composed = _balance_sums_composed(c, c - r, c + r)
    assert torch.allclose(fused, composed, rtol=1e-12, atol=1e-12)
    weights = torch.randn(2, 2, generator=g, dtype=torch.float64)
    (g_fused,) = torch.autograd.grad((fused * weights).sum(), c)
    (g_composed,) = torch.autograd.grad((composed * weights).sum(), c)
    assert torch.allclose(g_fused, g_composed, rtol=1e-10, atol=1e-12)
    masks = torch.stack([(iv.lower > 0), (iv.upper < 0)]).to(c.dtype).view(2, -1).detach()
    from datkit.certify.regularizers import BalanceSums

    assert torch.autograd.gradcheck(lambda t: BalanceSums.apply(t, masks), (c,))


# --- the methods -----------------------------------------------------------------------------------

def _setup(method: str, *extra: str, model: str = "cnn_7layer_bn"):
    cfg = load_config(None, [f"method.name={method}", "data.name=digits", "attack.eps=0.2", "eval.eps=0.2", *extra])
    torch.manual_seed(0)
    kwargs = dict(width=4, linear_size=16) if model == "cnn_7layer_bn" else dict(channels=[4, 8], hidden=16)
    net = create_model(model, 10, 1, 8, mean=(0.3,), std=(0.4,), **kwargs)
    m = create_method(cfg)
    m.prepare_model(net)
    net.train()
    g = torch.Generator().manual_seed(1)
    return cfg, m, net, torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_eps_zero_without_regularizer_is_clean_training(method: str) -> None:
    cfg, m, net, x, y = _setup(method, "bounds.reg_lambda=0")
    loss = m.loss(net, net, x, y, StepInfo(eps=0.0))
    assert loss.item() == pytest.approx(F.cross_entropy(net(x), y).item(), rel=1e-5)


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_robust_loss_bounds_the_clean_loss_and_reaches_every_parameter(method: str) -> None:
    cfg, m, net, x, y = _setup(method, "bounds.reg_lambda=0")
    loss = m.loss(net, net, x, y, StepInfo(eps=0.1))
    clean = F.cross_entropy(net(x), y)  # train mode: the same batch statistics as the bounds
    assert loss.item() >= clean.item() - 1e-5
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_regularizer_weight_decays_over_the_warmup() -> None:
    cfg, m, net, x, y = _setup("ibp", "bounds.reg_lambda=0.5")
    assert m.reg_weight(0.0) == pytest.approx(0.5) and m.reg_weight(0.1) == pytest.approx(0.25)
    assert m.reg_weight(0.2) == 0.0
    with_reg = m.loss(net, net, x, y, StepInfo(eps=0.0))
    assert with_reg.item() > F.cross_entropy(net(x), y).item()  # the bounds explode at init: the regularizer is > 0
    _, m0, *_ = _setup("ibp", "bounds.reg_lambda=0")
    at_max = [mm.loss(net, net, x, y, StepInfo(eps=0.2)).item() for mm in (m, m0)]
    assert at_max[0] == pytest.approx(at_max[1], rel=1e-6), "no regularizer once eps_t = eps_max"


def test_crown_ibp_mixes_with_beta_and_is_ibp_after_the_ramp() -> None:
    """The method's loss (margin form, ``bounds.loss_fusion=false``; the fused form: ``tests/test_loss_fusion.py``)
    against bounds computed without datkit's engine (``tests/helpers/bounds_reference.py``,
    itself checked against an LP in ``tests/test_bounds.py``), on a ReLU network where CROWN-IBP and IBP differ:
    CROWN-IBP returning IBP's bounds, or a wrong mixing weight, fails here."""
    from datkit.models import Normalize, NormalizedModel
    from helpers import bounds_reference as ref

    _, m, _, x, y = _setup("crown-ibp", "bounds.reg_lambda=0", "bounds.loss_fusion=false")  # the margin form
    _, mi, *_ = _setup("ibp", "bounds.reg_lambda=0")
    torch.manual_seed(0)
    net = NormalizedModel(Normalize((0.3,), (0.4,)), nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))).train()
    C = spec_matrix(y, 10)

    def ref_bounds(fn, eps: float) -> torch.Tensor:
        return torch.from_numpy(fn(net, x, eps, C)).float()

    lb_ibp, lb_crown = ref_bounds(ref.ibp, 0.05), ref_bounds(ref.crown_ibp, 0.05)
    expected = robust_cross_entropy(0.75 * lb_crown + 0.25 * lb_ibp)  # beta = 1 - 0.05 / 0.2
    # the two bounds differ enough that the mixture is told apart from IBP alone and from CROWN-IBP alone
    for other in (robust_cross_entropy(lb_ibp), robust_cross_entropy(lb_crown)):
        assert abs(expected.item() - other.item()) > 1e-3 * abs(expected.item()), (expected, other)
    assert m.loss(net, net, x, y, StepInfo(eps=0.05)).item() == pytest.approx(expected.item(), rel=1e-5)
    # at eps_max (beta = 0) the loss is IBP's, as for method ibp
    at_max = robust_cross_entropy(ref_bounds(ref.ibp, 0.2)).item()
    assert m.loss(net, net, x, y, StepInfo(eps=0.2)).item() == pytest.approx(at_max, rel=1e-5)
    assert mi.loss(net, net, x, y, StepInfo(eps=0.2)).item() == pytest.approx(at_max, rel=1e-5)


def test_train_eps_follows_the_bounds_schedule() -> None:
    cfg, m, *_ = _setup("ibp", "bounds.eps_schedule=linear", "bounds.eps_start=1", "bounds.eps_length=4")
    assert [m.train_eps(p) for p in (0.5, 1.0, 3.0, 5.0, 9.0)] == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.2])


def test_verified_accuracy_metric() -> None:
    cfg, m, net, x, y = _setup("ibp")
    net.eval()
    metric = m.eval_metrics()["VA"]
    assert isinstance(metric, VerifiedAccuracy) and metric.complement == "VE" and metric.eps == 0.2
    clean_correct = int((net(x).argmax(1) == y).sum())
    assert VerifiedAccuracy(0.0, "ibp").correct(net, x, y) == clean_correct  # eps = 0: verified = correct
    for bound in ("ibp", "crown-ibp"):
        assert 0 <= VerifiedAccuracy(0.05, bound).correct(net, x, y) <= clean_correct
    # a trained network (tests/test_bounds.py's, which fits its clusters) is verified on its training points: at
    # eps 0.05 CROWN-IBP verifies 6 of 6 and IBP 3 of 6 here (both checked against an LP there); at 0.01 both all 6
    from test_bounds import trained_mlp

    net, x, y = trained_mlp()
    va = {b: VerifiedAccuracy(0.05, b).correct(net, x, y) for b in ("ibp", "crown-ibp")}
    assert va["crown-ibp"] >= 5 and va["ibp"] >= 2 and va["crown-ibp"] >= va["ibp"], va
    assert VerifiedAccuracy(0.01, "ibp").correct(net, x, y) == 6


def test_spec_matrix_rows() -> None:
    C = spec_matrix(torch.tensor([2, 0]), 4)
    assert C.shape == (2, 3, 4)
    assert C[0].tolist() == [[-1, 0, 1, 0], [0, -1, 1, 0], [0, 0, 1, -1]]
    assert ((C == -1).sum(-1) == 1).all() and (C.sum(-1) == 0).all()
    assert C[1, :, 0].tolist() == [1, 1, 1] and C[1, :, 1:].tolist() == (-torch.eye(3)).tolist()


# --- configuration ---------------------------------------------------------------------------------

def test_auto_lirpa_engine_says_it_is_not_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("auto_LiRPA") is not None:
        pytest.skip("auto_LiRPA is installed here: the not-installed message cannot be shown")
    cfg = load_config(None, ["method.name=ibp", "bounds.engine=auto_lirpa"])
    with pytest.raises(ConfigError) as exc:
        validate_config(cfg)
    msg = str(exc.value)
    assert "bounds.engine=auto_lirpa" in msg and "not importable" in msg and "bounds.engine=native" in msg
    with pytest.raises(ConfigError, match="install it from source"):  # the method checks its own section when built
        create_method(cfg)


@pytest.mark.parametrize("override, key", [("bounds.engine=lirpa", "bounds.engine"),
                                           ("bounds.eps_schedule=cosine", "bounds.eps_schedule"),
                                           ("bounds.init=xavier", "bounds.init"),
                                           ("bounds.reg_lambda=-1", "bounds.reg_lambda"),
                                           ("bounds.reg_terms=[std]", "bounds.reg_terms"),
                                           ("bounds.verify=[ibp,lp]", "bounds.verify"),
                                           ("bounds.eps_length=-2", "bounds.eps_length")])
def test_bad_bounds_values_are_named(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(load_config(None, ["method.name=ibp", override]))


# --- end to end ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_tiny_run_reports_verified_accuracy(method: str, tmp_path: Path) -> None:
    final = train_inprocess([f"method.name={method}", "attack.eps=0.05", "eval.eps=0.05", "bounds.eps_start=0",
                             "bounds.eps_length=1", "train.epochs=2", "train.max_steps=4", "train.grad_clip=10",
                             f"train.output_dir={tmp_path}"])
    payload = json.loads((tmp_path / "results.json").read_text())
    for r in payload["epochs"]:
        assert {"TA", "RA", "VA", "VE"} <= set(r), r
        assert r["VA"] + r["VE"] == pytest.approx(1.0)
        assert r["VA"] <= r["RA"] + 1e-9 and r["VA"] <= r["TA"] + 1e-9, "verified examples resist PGD too"
    assert payload["epochs"][0]["eps"] == pytest.approx(0.05)
    assert {"VA", "VE"} <= set(final)
    md = (tmp_path / "results.md").read_text()
    assert "| VA | verified err |" in md and f"VA {final['VA']:.4f}" in md


def test_crown_ibp_beta_final_keeps_crown_ibp_after_the_ramp() -> None:
    """``bounds.beta_final``: after the ramp the loss is IBP's at the default 0 and the fused CROWN-IBP bound at 1."""
    from datkit.certify.bounds import fused_loss

    _, m0, net, x, y = _setup("crown-ibp", "bounds.reg_lambda=0")
    _, m1, _, _, _ = _setup("crown-ibp", "bounds.reg_lambda=0", "bounds.beta_final=1")
    _, ibp, _, _, _ = _setup("ibp", "bounds.reg_lambda=0")
    at_max = StepInfo(eps=0.2)
    assert m0.loss(net, net, x, y, at_max).item() == pytest.approx(ibp.loss(net, net, x, y, at_max).item(), rel=1e-6)
    want = fused_loss(net, x, y, 0.2, beta=1.0, num_classes=10).loss
    got = m1.loss(net, net, x, y, at_max)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert abs(got.item() - ibp.loss(net, net, x, y, at_max).item()) > 1e-2, "beta_final = 1 must not be IBP"
    with pytest.raises(ConfigError, match=r"bounds\.beta_final"):
        validate_config(load_config(None, ["method.name=crown-ibp", "bounds.beta_final=1.5"]))
