"""Every registered training method and optimizer: one step with a tiny model gives a finite scalar loss whose
gradient lands on the parameters only (the attack differentiates w.r.t. the input without touching ``.grad``)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from datkit.config import load_config
from datkit.methods import METHODS, StepInfo, create_method
from datkit.models import create_model
from datkit.optim import OPTIMIZERS, build_optimizer
from helpers.runs import load_checkpoint, one_thread, train_inprocess

METHOD_NAMES = METHODS.names()
OPTIMIZER_NAMES = OPTIMIZERS.names()


def _setup(method: str, optimizer: str = "adam", *extra: str):
    cfg = load_config(None, [f"method.name={method}", f"optim.name={optimizer}", "attack.steps=2", *extra])
    torch.manual_seed(0)
    model = create_model("cnn_small", num_classes=10, in_channels=1, image_size=8, mean=(0.3,), std=(0.4,),
                         channels=[4, 8], hidden=16)
    x = torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    return cfg, model, x, y


def test_builtin_methods_and_optimizers_registered() -> None:
    assert {"clean", "pgd", "fgsm", "trades"} <= set(METHOD_NAMES)
    assert {"sgd", "adam", "lalr"} <= set(OPTIMIZER_NAMES)


@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_one_step(method: str, optimizer: str) -> None:
    cfg, model, x, y = _setup(method, optimizer)
    model.train()
    x0 = x.clone()
    with one_thread():
        loss = create_method(cfg).loss(model, model, x, y, StepInfo(eps=0.1))
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0, f"loss of shape {tuple(loss.shape)}"
        assert math.isfinite(loss.detach().item()) and loss.detach().item() > 0
        assert loss.requires_grad
        # building the loss (attack included) must not have written parameter or input gradients
        assert all(p.grad is None for p in model.parameters()), "the method left gradients on the parameters"
        assert x.grad is None and not x.requires_grad and torch.equal(x, x0), "the method modified the input"
        assert model.training, "the method left the model in eval mode"

        loss.backward()
        assert x.grad is None
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert any(float(g.abs().max()) > 0 for g in grads.values())

        opt = build_optimizer(cfg.optim, model.parameters(), cfg.train.batch_size)
        if hasattr(opt, "plan"):  # as build_run does: phases given as fractions of the run (1-bit Adam's freeze_step)
            opt.plan(10)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "the optimizer step changed nothing"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("method", [m for m in ("clean", "pgd", "fgsm", "trades") if m in METHOD_NAMES])
def test_zero_eps_is_clean_training(method: str) -> None:
    # with eps = 0 the adversarial example is the input itself: every objective reduces to CE(f(x), y)
    cfg, model, x, y = _setup(method, "adam", "method.lam=0")
    with one_thread():
        loss = create_method(cfg).loss(model, model, x, y, StepInfo(eps=0.0))
        clean = F.cross_entropy(model(x), y)
    assert loss.detach().item() == pytest.approx(clean.detach().item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("method", [m for m in ("pgd", "fgsm") if m in METHOD_NAMES])
def test_dat_objective_weights_the_clean_loss(method: str) -> None:
    # loss = lam * CE(f(x), y) + CE(f(x_adv), y); at eps = 0 that is (1 + lam) * CE(f(x), y)
    cfg, model, x, y = _setup(method, "adam", "method.lam=0.5")
    with one_thread():
        loss = create_method(cfg).loss(model, model, x, y, StepInfo(eps=0.0))
        clean = F.cross_entropy(model(x), y)
    assert loss.detach().item() == pytest.approx(1.5 * clean.detach().item(), rel=1e-5)


@pytest.mark.parametrize("method", [m for m in ("pgd", "fgsm") if m in METHOD_NAMES])
def test_attack_increases_the_loss(method: str) -> None:
    cfg, model, x, y = _setup(method, "adam", "attack.random_start=false", "attack.steps=5")
    with one_thread():
        adv = create_method(cfg).loss(model, model, x, y, StepInfo(eps=0.3)).detach().item()
        clean = F.cross_entropy(model(x), y).detach().item()
    assert adv > clean


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_train_main_one_step(method: str, tmp_path) -> None:
    final = train_inprocess([f"method.name={method}", "train.epochs=1", "train.max_steps=1",
                             f"train.output_dir={tmp_path}"])
    assert 0.0 <= final["TA"] <= 1.0
    state = load_checkpoint(tmp_path)
    assert math.isfinite(state["records"][0]["train_loss"])
    assert str(method) in state["config"]
