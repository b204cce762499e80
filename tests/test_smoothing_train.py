"""``method=smoothing``: Gaussian noise augmentation (Cohen et al. 2019) and SmoothAdv (Salman et al. 2019).

(The generic checks -- finite loss, gradients on the parameters only, one training run -- run for every
registered method in test_methods.py.)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datkit.config import load_config
from datkit.methods import StepInfo, create_method
from datkit.methods.smoothing import _SoftSmoothed
from datkit.models import create_model
from helpers.runs import one_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _setup(*overrides: str):
    cfg = load_config(None, ["method.name=smoothing", *overrides])
    torch.manual_seed(0)
    model = create_model("cnn_small", num_classes=10, in_channels=1, image_size=8, mean=(0.3,), std=(0.4,),
                         channels=[4, 8], hidden=16)
    return cfg, model, torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))


@pytest.mark.parametrize("num_noise", [1, 3])
def test_gaussian_augmentation_loss(num_noise: int) -> None:
    cfg, model, x, y = _setup("smoothing.sigma=0.5", f"smoothing.num_noise={num_noise}")
    torch.manual_seed(123)
    loss = create_method(cfg).loss(model, model, x, y, StepInfo(eps=0.0))
    torch.manual_seed(123)
    noise = torch.randn(x.shape[0], num_noise, *x.shape[1:]).transpose(0, 1) * 0.5  # drawn per sample, then (m, B, ...)
    expected = torch.stack([F.cross_entropy(model(x + e), y) for e in noise]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-3), "no noise was added"


def test_smoothadv_attack_stays_in_the_ball_and_raises_the_smoothed_loss() -> None:
    cfg, model, x, y = _setup("smoothing.adv_steps=4", "smoothing.adv_eps=0.5", "smoothing.num_noise=2")
    method = create_method(cfg)
    assert method.uses_attack
    noise = torch.randn(2, *x.shape) * cfg.smoothing.sigma
    model.train()
    x_adv = method.smoothadv(model, x, y, noise, eps=0.5)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    soft = _SoftSmoothed(model.eval(), noise)
    assert F.nll_loss(soft(x_adv), y).item() > F.nll_loss(soft(x), y).item()
    # the soft smoothed classifier's log-probabilities are the log of the mean softmax over the noise
    probs = torch.stack([F.softmax(model(x + e), 1) for e in noise]).mean(0)
    assert torch.allclose(soft(x).exp(), probs, atol=1e-6)


def test_smoothadv_eps_follows_the_attack_eps_ramp() -> None:
    cfg, *_ = _setup("smoothing.adv_steps=2", "smoothing.adv_eps=0.5", "attack.eps=0.4")
    method = create_method(cfg)
    assert method.adv_eps(StepInfo(eps=0.2)) == pytest.approx(0.25)
    assert method.adv_eps(StepInfo(eps=0.4)) == pytest.approx(0.5)
    cfg, *_ = _setup("smoothing.adv_steps=2", "smoothing.adv_eps=0.5", "attack.eps=0")
    assert create_method(cfg).adv_eps(StepInfo(eps=0.0)) == pytest.approx(0.5)


def test_smoothadv_training_step_gradients_on_parameters_only() -> None:
    cfg, model, x, y = _setup("smoothing.adv_steps=2", "smoothing.num_noise=2")
    x0 = x.clone()
    loss = create_method(cfg).loss(model, model, x, y, StepInfo(eps=cfg.attack.eps))
    assert all(p.grad is None for p in model.parameters()) and torch.equal(x, x0)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
