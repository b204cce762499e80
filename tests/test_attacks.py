"""Tests of datkit.attacks on a tiny MLP trained once on the 8x8 digits of scikit-learn."""
from __future__ import annotations

import copy
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datkit.attacks import ATTACKS, FGSM, PGD, Attack, AutoAttack, create_attack

# (name, norm, kwargs): every registered attack under every norm it supports.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("pgd", "linf", dict(eps=0.1, alpha=0.02, steps=10)),
    ("pgd", "l2", dict(eps=1.0, alpha=0.25, steps=10)),
    ("fgsm", "linf", dict(eps=0.1)),
    ("autoattack", "linf", dict(eps=0.2, n_classes=10)),  # APGD fools all: no slow Square runs
    ("autoattack", "l2", dict(eps=1.0, n_classes=10)),
]
CASE_IDS = [f"{name}-{norm}" for name, norm, _ in CASES]


def make(name: str, norm: str, kwargs: dict[str, Any], **extra: Any) -> Attack:
    if name == "autoattack":
        pytest.importorskip("torchattacks")
    return create_attack(name, norm=norm, **kwargs, **extra)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).div(16.0).view(-1, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1500], perm[1500:1700]
    return x[train], y[train], x[test], y[test]


@pytest.fixture(scope="module")
def model(data) -> nn.Module:
    """A 64-64-10 MLP trained full-batch (~98% test accuracy); tests must not modify it."""
    x, y, _, _ = data
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    for p in net.parameters():
        p.grad = None
    return net.eval()


@pytest.fixture()
def batch(data) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, x, y = data
    return x[:32], y[:32]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


class ModeProbe(nn.Module):
    """Wraps a model and records the ``training`` flag seen by every forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training)
        return self.model(x)


class Explodes(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("forward must not be called")


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
def test_registry_names_and_cases_cover_all_attacks() -> None:
    assert {"pgd", "fgsm", "autoattack"} <= set(ATTACKS.names())
    assert {name for name, _, _ in CASES} == set(ATTACKS.names()), "add new attacks to CASES"
    assert isinstance(create_attack("pgd", eps=0.1), PGD)
    assert isinstance(create_attack("fgsm", eps=0.1), FGSM)
    with pytest.raises(KeyError, match="pgd"):
        create_attack("cw")


def test_defaults() -> None:
    pgd = PGD()
    assert (pgd.eps, pgd.alpha, pgd.steps, pgd.random_start, pgd.norm, pgd.restarts) == (0.3, 0.01, 40, True, "linf", 1)
    assert pgd.eval_mode is False and pgd.generator is None
    fgsm = FGSM(eps=0.2)
    assert fgsm.alpha == pytest.approx(0.25) and fgsm.random_start and fgsm.norm == "linf"


# ----------------------------------------------------------------------------------------------
# output contract: in the ball, in [0, 1], detached, same shape and dtype
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "norm", "kwargs"), CASES, ids=CASE_IDS)
def test_output_in_ball_and_range(model, batch, name, norm, kwargs) -> None:
    x, y = batch
    atk = make(name, norm, kwargs)
    x_in = x.clone().requires_grad_(True)  # a grad-requiring input must not leak into the output
    x_adv = atk(model, x_in, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert x_in.grad is None
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= atk.eps + 1e-6
    else:
        assert (delta.norm(dim=1) <= atk.eps + 1e-5).all()
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize(("name", "norm", "kwargs"), CASES, ids=CASE_IDS)
def test_eps_zero_is_identity_without_forward(name, norm, kwargs, batch) -> None:
    x, y = batch
    atk = make(name, norm, {**kwargs, "eps": 0.0})
    x_adv = atk(Explodes(), x, y)
    assert torch.equal(x_adv, x) and x_adv.data_ptr() != x.data_ptr()


# ----------------------------------------------------------------------------------------------
# strength
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "atk",
    [PGD(eps=0.1, alpha=0.02, steps=10), PGD(eps=1.0, alpha=0.25, steps=10, norm="l2"), FGSM(eps=0.1)],
    ids=["pgd-linf", "pgd-l2", "fgsm"],
)
def test_attack_lowers_accuracy(model, data, atk) -> None:
    _, _, x, y = data
    clean = accuracy(model, x, y)
    robust = accuracy(model, atk(model, x, y), y)
    assert clean > 0.9
    assert robust < clean - 0.4, (clean, robust)


def test_pgd_stronger_than_fgsm(model, data) -> None:
    _, _, x, y = data
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pgd = accuracy(model, PGD(eps=0.1, alpha=0.02, steps=10, generator=g())(model, x, y), y)
    fgsm = accuracy(model, FGSM(eps=0.1, generator=g())(model, x, y), y)
    assert pgd <= fgsm


def test_restarts_at_least_as_strong(model, data) -> None:
    _, _, x, y = data
    kwargs = dict(eps=0.05, alpha=0.01, steps=5)  # weak enough that restarts can help
    one = PGD(**kwargs, restarts=1, generator=torch.Generator().manual_seed(3))(model, x, y)
    many = PGD(**kwargs, restarts=4, generator=torch.Generator().manual_seed(3))(model, x, y)
    with torch.no_grad():
        fooled_one = model(one).argmax(1) != y
        fooled_many = model(many).argmax(1) != y
    assert (fooled_many | ~fooled_one).all(), "a sample fooled by restart 1 must stay fooled"
    assert fooled_many.sum() >= fooled_one.sum()
    assert (many - x).abs().max() <= 0.05 + 1e-6


def test_autoattack_at_least_as_strong_as_pgd(model, batch) -> None:
    pytest.importorskip("torchattacks")
    x, y = batch
    pgd = accuracy(model, PGD(eps=0.1, alpha=0.02, steps=10)(model, x, y), y)
    aa = accuracy(model, AutoAttack(eps=0.1)(model, x, y), y)
    assert aa <= pgd + 1e-9


# ----------------------------------------------------------------------------------------------
# side effects: parameter gradients, model mode, RNG
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "norm", "kwargs"), CASES, ids=CASE_IDS)
def test_no_parameter_gradients(model, batch, name, norm, kwargs) -> None:
    x, y = batch
    net = copy.deepcopy(model)
    atk = make(name, norm, kwargs)
    atk(net, x, y)
    assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())

    old = [torch.randn_like(p) for p in net.parameters()]
    for p, g in zip(net.parameters(), old):
        p.grad = g.clone()
    atk(net, x, y)
    for p, g in zip(net.parameters(), old):
        assert torch.equal(p.grad, g)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("eval_mode", [False, True])
@pytest.mark.parametrize("start_training", [False, True])
@pytest.mark.parametrize(("name", "norm", "kwargs"), CASES[::2], ids=CASE_IDS[::2])
def test_model_mode_used_and_restored(model, batch, name, norm, kwargs, eval_mode, start_training) -> None:
    x, y = batch
    probe = ModeProbe(copy.deepcopy(model)).train(start_training)
    probe.model[1].train(not start_training)  # a submodule in the other mode must be restored too
    atk = make(name, norm, kwargs, eval_mode=eval_mode)
    atk(probe, x[:8], y[:8])
    assert probe.seen, "the attack never called the model"
    expected = False if eval_mode else start_training
    assert set(probe.seen) == {expected}
    assert probe.training is start_training and probe.model[0].training is start_training
    assert probe.model[1].training is (not start_training)


def test_autoattack_guards_against_backward_and_mode_switches(model, batch) -> None:
    """torchattacks' FAB calls ``.backward()`` and torchattacks flips the model to eval; a stub that
    does both checks that the wrapper keeps parameter grads untouched and the model's mode as set."""
    pytest.importorskip("torchattacks")

    class StubAutoAttack:
        def __init__(self, model: nn.Module, **kwargs: Any) -> None:
            self.model = model

        def set_device(self, device: torch.device) -> None:
            pass

        def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            self.model.eval()
            x = x.clone().requires_grad_(True)
            F.cross_entropy(self.model(x), y).backward()
            self.model.train()
            return (x + 0.5 * x.grad.sign()).detach()  # outside the ball: the wrapper projects it

    x, y = batch
    probe = ModeProbe(copy.deepcopy(model)).train()
    atk = AutoAttack(eps=0.1)
    atk._torchattacks = SimpleNamespace(AutoAttack=StubAutoAttack)
    x_adv = atk(probe, x, y)
    assert probe.seen == [True] and all(m.training for m in probe.modules())
    assert all(p.grad is None and p.requires_grad for p in probe.parameters())
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_mode_restored_when_attack_raises(model, batch) -> None:
    class Boom(Attack):
        def perturb(self, model, x, y):
            raise RuntimeError("boom")

    net = copy.deepcopy(model).train()
    with pytest.raises(RuntimeError, match="boom"):
        Boom(0.1, eval_mode=True)(net, *batch)
    assert all(m.training for m in net.modules())


@pytest.mark.parametrize(
    "factory",
    [
        lambda g: PGD(eps=0.1, alpha=0.02, steps=3, generator=g),
        lambda g: PGD(eps=1.0, alpha=0.25, steps=3, norm="l2", generator=g),
        lambda g: FGSM(eps=0.1, generator=g),
    ],
    ids=["pgd-linf", "pgd-l2", "fgsm"],
)
def test_seeded_generator_is_reproducible(model, batch, factory) -> None:
    x, y = batch
    rng_state = torch.get_rng_state()
    a = factory(torch.Generator().manual_seed(7))(model, x, y)
    b = factory(torch.Generator().manual_seed(7))(model, x, y)
    c = factory(torch.Generator().manual_seed(8))(model, x, y)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), rng_state), "a generator must leave the global RNG alone"


def test_autoattack_is_seeded_and_keeps_global_rng(model, batch) -> None:
    pytest.importorskip("torchattacks")
    x, y = batch
    rng_state = torch.get_rng_state()
    a = AutoAttack(eps=0.2, seed=1)(model, x[:8], y[:8])
    b = AutoAttack(eps=0.2, seed=1)(model, x[:8], y[:8])
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), rng_state)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (PGD, dict(eps=-0.1), "eps"),
        (PGD, dict(eps=float("nan")), "eps"),
        (PGD, dict(steps=0), "steps"),
        (PGD, dict(steps=2.5), "steps"),
        (PGD, dict(alpha=0.0), "alpha"),
        (PGD, dict(restarts=0), "restarts"),
        (PGD, dict(norm="l3"), r"norm must be one of 'linf', 'l2'"),
        (PGD, dict(generator=0), "generator"),
        (FGSM, dict(eps=-1.0), "eps"),
        (FGSM, dict(alpha=-0.1), "alpha"),
        (FGSM, dict(norm="l2"), r"norm must be one of 'linf'"),
        (AutoAttack, dict(eps=-0.1), "eps"),
        (AutoAttack, dict(norm="l3"), "norm"),
        (AutoAttack, dict(version="fast"), "version"),
        (AutoAttack, dict(n_classes=1), "n_classes"),
    ],
)
def test_bad_constructor_arguments(cls, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    ("transform", "match"),
    [
        (lambda x, y: (x * 2.0, y), r"x must lie in \[0, 1\]"),
        (lambda x, y: (x - 0.5, y), r"x must lie in \[0, 1\]"),
        (lambda x, y: (x.masked_fill(x > 0.5, float("nan")), y), r"x must lie in \[0, 1\]"),
        (lambda x, y: ((x * 255).to(torch.uint8), y), "x must be a floating-point"),
        (lambda x, y: (x, y[:-1]), "y must have shape"),
        (lambda x, y: (x, y.float()), "y must be an integer"),
    ],
    ids=["above-1", "below-0", "nan", "uint8", "y-shape", "y-float"],
)
def test_bad_inputs(model, batch, transform, match) -> None:
    x, y = transform(*batch)
    for atk in (PGD(eps=0.1, steps=1), FGSM(eps=0.1)):
        with pytest.raises(ValueError, match=match):
            atk(model, x, y)


def test_autoattack_needs_images(model, batch) -> None:
    pytest.importorskip("torchattacks")
    x, y = batch
    flat = nn.Sequential(nn.Flatten(), model)  # same model, flat inputs
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        AutoAttack(eps=0.1)(flat, x.flatten(1), y)


def test_autoattack_import_error_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # makes `import torchattacks` fail
    with pytest.raises(ImportError, match=r'pip install "datkit\[autoattack\]"'):
        AutoAttack(eps=0.1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_batch_size_does_not_change_per_sample_result(model, batch, norm) -> None:
    x, y = batch
    atk = PGD(eps=0.1 if norm == "linf" else 1.0, alpha=0.02, steps=5, random_start=False, norm=norm)
    full = atk(model, x, y)
    halves = torch.cat([atk(model, x[:16], y[:16]), atk(model, x[16:], y[16:])])
    # equal up to rare sign flips of near-zero gradient entries under different BLAS blockings
    assert (full - halves).abs().gt(1e-5).float().mean() < 0.01
