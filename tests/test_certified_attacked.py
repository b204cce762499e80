"""MTL-IBP, CC-IBP and SABR (``datkit.methods.certified_attacked``): the losses against independent computations,
their limits (MTL-IBP and CC-IBP at alpha 0 / 1 = PGD / IBP training, SABR with the full box = IBP training, as
whole runs with the same final weights), the small box inside the eps box, and the config checks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from datkit.attacks import PGD
from datkit.certify.bounds import margin_bounds
from datkit.config import ConfigError, load_config
from datkit.methods import StepInfo, create_method
from datkit.methods.certified import robust_cross_entropy
from datkit.models import create_model
from datkit.preflight import validate_config
from helpers.runs import assert_same_weights, load_checkpoint, one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _setup(method: str, *extra: str):
    """cnn_small (no BatchNorm: a train-mode forward is the eval-mode one) on 16 random 8x8 images, eps 0.2."""
    cfg = load_config(None, [f"method.name={method}", "data.name=digits", "attack.eps=0.2", "eval.eps=0.2",
                             "bounds.reg_lambda=0", "attack.steps=3", *extra])
    torch.manual_seed(0)
    net = create_model("cnn_small", 10, 1, 8, mean=(0.3,), std=(0.4,), channels=[4, 8], hidden=16)
    m = create_method(cfg)
    m.prepare_model(net)
    g = torch.Generator().manual_seed(1)
    return m, net, torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


@pytest.mark.parametrize("method", ["mtl-ibp", "cc-ibp"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_expressive_losses_against_their_formulas(method: str, alpha: float) -> None:
    m, net, x, y = _setup(method, f"bounds.alpha={alpha}")
    torch.manual_seed(5)
    loss = m.loss(net, net, x, y, StepInfo(eps=0.1))
    torch.manual_seed(5)  # the same random start
    x_adv = PGD(eps=0.1, alpha=2.5 * 0.1 / 3, steps=3)(net, x, y)
    logits = net(x_adv)
    m_adv = logits.gather(1, y[:, None]) - logits  # f_y - f_j, then drop j = y
    m_adv = m_adv[torch.arange(10).expand(16, -1) != y[:, None]].view(16, 9)
    m_ibp = margin_bounds(net, x, y, 0.1, "ibp").lower
    if method == "mtl-ibp":
        want = alpha * robust_cross_entropy(m_ibp) + (1 - alpha) * F.cross_entropy(logits, y)
    else:
        want = robust_cross_entropy(alpha * m_ibp + (1 - alpha) * m_adv)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    if alpha == 0:
        assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert m_ibp.le(m_adv + 1e-5).all(), "IBP's margins bound the margins at any point of the box"


def test_sabr_bounds_a_small_box_inside_the_eps_box() -> None:
    m, net, x, y = _setup("sabr", "bounds.lambda_box=0.3")
    seen = {}
    original = m.margins

    def spy(raw, center, y_, eps, stats):
        seen["center"], seen["tau"] = center, eps
        return original(raw, center, y_, eps, stats)

    m.margins = spy
    torch.manual_seed(5)
    loss = m.loss(net, net, x, y, StepInfo(eps=0.1))
    center, tau = seen["center"], seen["tau"]
    assert tau == pytest.approx(0.03)
    torch.manual_seed(5)
    x_pgd = PGD(eps=0.1, alpha=2.5 * 0.1 / 3, steps=3)(net, x, y)  # over the whole eps-box, then pulled in
    torch.testing.assert_close(center, x + (x_pgd - x).clamp(-0.07, 0.07), rtol=0, atol=1e-7)
    assert (center - x).abs().max().item() <= 0.07 + 1e-6 and (center - x).abs().max().item() > 0.03
    full = robust_cross_entropy(margin_bounds(net, x, y, 0.1, "ibp").lower)
    assert loss.item() <= full.item() + 1e-6, "IBP over a sub-box is at least as tight as over the eps-box"
    small = margin_bounds(net, center, y, tau, "ibp").lower
    assert loss.item() == pytest.approx(robust_cross_entropy(small).item(), rel=1e-6)
    assert loss.item() >= F.cross_entropy(net(center), y).item() - 1e-6, "the bound holds at the box's centre"
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# --- whole runs: the limits are the methods they generalize ------------------------------------------------

RUN = ["backend=torch", "device=cpu", "eval.aa_samples=0", "log.progress=false", "log.tensorboard=false",
       "log.plot=false", "data.name=digits", "model.name=cnn_7layer_bn", "model.kwargs.width=4",
       "model.kwargs.linear_size=16", "attack.eps=0.05", "eval.eps=0.05", "attack.steps=2",
       "bounds.eps_schedule=linear", "bounds.eps_start=0", "bounds.eps_length=1", "bounds.reg_lambda=0.5",
       "train.epochs=1", "train.max_steps=3", "train.grad_clip=10",
       "eval.num_samples=20", "eval.final_num_samples=20", "eval.pgd_steps=2",
       "optim.name=sgd", "optim.lr=0.05"]  # SGD: Adam turns rounding noise in near-zero gradients into lr-sized steps
LIMITS = {  # (method run, the run it must equal)
    "mtl-ibp alpha=1 == ibp": (["method.name=mtl-ibp", "bounds.alpha=1"], ["method.name=ibp"]),
    "cc-ibp alpha=1 == ibp": (["method.name=cc-ibp", "bounds.alpha=1"], ["method.name=ibp"]),
    "sabr lambda=1 == ibp": (["method.name=sabr", "bounds.lambda_box=1"], ["method.name=ibp"]),
    **{f"{m} alpha=0 == pgd lam=0": ([f"method.name={m}", "bounds.alpha=0", "bounds.init=default",
                                      "bounds.reg_lambda=0"],
                                     ["method.name=pgd", "method.lam=0", "attack.eps_warmup_epochs=1"])
       for m in ("mtl-ibp", "cc-ibp")},
}


def _train(overrides: list[str]) -> None:
    from datkit.train import main

    main([*RUN, *overrides])


@pytest.fixture(scope="module")
def ibp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ibp")
    _train([*LIMITS["sabr lambda=1 == ibp"][1], f"train.output_dir={out}"])
    return out


@pytest.fixture(scope="module")
def pgd_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pgd")
    _train([*LIMITS["mtl-ibp alpha=0 == pgd lam=0"][1], f"train.output_dir={out}"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LIMITS))
def test_limits_train_the_same_weights(case: str, ibp_run: Path, pgd_run: Path, tmp_path: Path) -> None:
    mine, theirs = LIMITS[case]
    _train([*mine, f"train.output_dir={tmp_path / 'mine'}"])
    ref = ibp_run if theirs == LIMITS["sabr lambda=1 == ibp"][1] else pgd_run
    a, b = load_checkpoint(tmp_path / "mine"), load_checkpoint(ref)
    assert_same_weights(a["model"], b["model"], atol=1e-6)
    assert a["records"][0]["train_loss"] == pytest.approx(b["records"][0]["train_loss"], rel=1e-6)


# Runs that the Horovod and DeepSpeed tests compare with the torch backend (2 workers each, in the launches of
# conftest.torch_onebit, test_horovod.hvd_runs and test_deepspeed.zero_runs): weights within 1e-5 after ONE
# step. Later steps attack slightly different weights (the backends sum gradients in different orders), and PGD's
# sign steps turn a 1e-8 difference into a different adversarial pixel: 2e-4 after 3 steps on Horovod.
_CERTIFIED = ["model.kwargs.hidden=32", "attack.eps=0.05", "eval.eps=0.05", "attack.steps=2", "bounds.eps_start=0",
              "bounds.eps_length=0", "bounds.reg_lambda=0", "train.epochs=1", "train.max_steps=1", "optim.name=sgd",
              "optim.lr=0.05", "schedule.name=constant", "train.grad_clip=10"]
CROSS_BACKEND = {"mtl_ibp": [*_CERTIFIED, "method.name=mtl-ibp", "bounds.alpha=0.5"],
                 "sabr": [*_CERTIFIED, "method.name=sabr", "bounds.lambda_box=0.5"]}


@pytest.mark.parametrize("override, key", [("bounds.alpha=1.5", "bounds.alpha"), ("bounds.alpha=-0.1", "bounds.alpha"),
                                           ("bounds.lambda_box=0", "bounds.lambda_box"),
                                           ("bounds.lambda_box=1.2", "bounds.lambda_box")])
def test_bad_alpha_and_lambda_are_named(override: str, key: str) -> None:
    method = "cc-ibp" if "alpha" in key else "sabr"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(load_config(None, [f"method.name={method}", override]))
