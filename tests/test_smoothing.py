"""``datkit.certify.Smooth`` (Cohen et al. 2019) on classifiers whose smoothed behaviour is known exactly.

- the Clopper-Pearson bound is SciPy's exact interval, the radius is ``sigma * Phi^-1(pA_lower)``;
- a constant classifier: ``pA = 1``, so ``nA = n`` and the radius is ``sigma * Phi^-1(alpha^(1/n))``;
- classifiers with ``pA <= 1/2`` (a coin flip, ten equally likely classes): CERTIFY and PREDICT abstain;
- a linear classifier ``sign(w.x + b)``: under N(0, sigma^2 I) noise ``pA = Phi(|w.x + b| / (sigma ||w||))``
  and the smoothed classifier's exact l2 robustness radius is the distance ``|w.x + b| / ||w||`` to the
  decision boundary; the certified radius approaches it from below as n grows;
- noise depends only on the generator's seed: reproducible, independent of what was certified before.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from torch import nn

from datkit.certify import Smooth
from datkit.certify.smoothed_classifier import certified_radius, example_generator, lower_confidence_bound
from helpers.runs import one_thread

PHI_INV = NormalDist().inv_cdf  # independent of scipy


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


class Constant(nn.Module):
    """Always predicts class ``c``."""

    def __init__(self, c: int, num_classes: int = 10) -> None:
        super().__init__()
        self.c, self.num_classes = c, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.num_classes)
        out[:, self.c] = 1.0
        return out


class Linear2(nn.Module):
    """Binary linear classifier: class 1 iff ``w.x + b > 0``."""

    def __init__(self, w: list[float], b: float) -> None:
        super().__init__()
        self.lin = nn.Linear(len(w), 1)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([w]))
            self.lin.bias.fill_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)


class NoiseArgmax(nn.Module):
    """The class is the argmax of the first ``k`` input coordinates: at x = 0, every class has probability 1/k."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, : self.k]


# --- the bound and the radius ---------------------------------------------------------------------------

@pytest.mark.parametrize("k, n, alpha", [(1, 10, 0.05), (37, 50, 0.001), (990, 1000, 0.001), (5000, 10000, 0.01),
                                         (99990, 100000, 0.001)])
def test_lower_bound_is_scipy_exact_interval(k: int, n: int, alpha: float) -> None:
    low = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert lower_confidence_bound(k, n, alpha) == pytest.approx(low, rel=1e-9, abs=1e-12)
    assert lower_confidence_bound(k, n, alpha) < k / n


def test_lower_bound_edge_cases() -> None:
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    # k = n: P(Binomial(n, p) >= n) = p^n = alpha at the bound
    assert lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-12)
    with pytest.raises(ValueError, match="alpha"):
        lower_confidence_bound(5, 10, 1.0)
    with pytest.raises(ValueError, match="k <= n"):
        lower_confidence_bound(11, 10, 0.01)


def test_radius_formula() -> None:
    assert certified_radius(0.5, NormalDist().cdf(1.0)) == pytest.approx(0.5, rel=1e-9)
    assert certified_radius(0.25, NormalDist().cdf(2.0)) == pytest.approx(0.5, rel=1e-9)
    assert certified_radius(0.12, 0.5) == pytest.approx(0.0, abs=1e-15)


# --- constructed classifiers with known answers ---------------------------------------------------------

@pytest.mark.parametrize("sigma, n, alpha", [(0.25, 1000, 0.001), (0.12, 10000, 0.001), (0.5, 500, 0.01)])
def test_constant_classifier_radius_is_closed_form(sigma: float, n: int, alpha: float) -> None:
    smooth = Smooth(Constant(7), num_classes=10, sigma=sigma)
    label, radius = smooth.certify(torch.rand(3, 4, 4), n0=100, n=n, alpha=alpha, batch_size=300)
    assert label == 7
    assert radius == pytest.approx(sigma * PHI_INV(alpha ** (1 / n)), rel=1e-9)
    assert smooth.predict(torch.rand(3, 4, 4), n=n, alpha=alpha, batch_size=300) == 7


def test_coin_flip_abstains() -> None:
    # class 1 iff the first noise coordinate is > 0: pA = 1/2 exactly, so pA_lower < 1/2
    smooth = Smooth(Linear2([1.0, 0.0], 0.0), num_classes=2, sigma=0.25)
    x = torch.zeros(2)
    assert smooth.certify(x, n0=100, n=2000, alpha=0.001, batch_size=500) == (Smooth.ABSTAIN, 0.0)
    assert smooth.predict(x, n=2000, alpha=0.001, batch_size=500) == Smooth.ABSTAIN


def test_ten_equally_likely_classes_abstain() -> None:
    smooth = Smooth(NoiseArgmax(10), num_classes=10, sigma=1.0)
    counts = smooth.sample_counts(torch.zeros(16), num=2000, batch_size=500)
    assert counts.sum() == 2000 and counts.min() > 100  # every class is drawn about 200 times
    assert smooth.certify(torch.zeros(16), n0=100, n=2000, alpha=0.001, batch_size=500) == (Smooth.ABSTAIN, 0.0)
    assert smooth.predict(torch.zeros(16), n=2000, alpha=0.001, batch_size=500) == Smooth.ABSTAIN


def test_majority_too_weak_to_certify_abstains() -> None:
    # pA = Phi(0.01 / 0.25) = 0.516: the true class, but with n = 1000 the bound stays below 1/2
    smooth = Smooth(Linear2([1.0], -0.5), num_classes=2, sigma=0.25)
    assert smooth.certify(torch.tensor([0.51]), n0=100, n=1000, alpha=0.001, batch_size=500) == (Smooth.ABSTAIN, 0.0)


@pytest.mark.parametrize("x, expected", [([0.9, 0.6, 0.3], 1), ([0.1, 0.2, 0.6], 0), ([0.8, 0.5, 0.5], 1)])
def test_linear_classifier_matches_closed_form(x: list[float], expected: int) -> None:
    w, b, sigma, n, alpha = [1.0, 2.0, -2.0], -0.5, 0.5, 20000, 0.001
    xt = torch.tensor(x)
    margin = sum(wi * xi for wi, xi in zip(w, x)) + b
    distance = abs(margin) / math.sqrt(sum(wi * wi for wi in w))  # the exact robustness radius of g
    p_a = NormalDist().cdf(distance / sigma)
    smooth = Smooth(Linear2(w, b), num_classes=2, sigma=sigma, seed=3)

    counts = smooth.sample_counts(xt, num=n, batch_size=4000)
    sd = math.sqrt(p_a * (1 - p_a) / n)
    assert abs(counts[expected] / n - p_a) < 4 * sd, (counts, p_a)

    label, radius = smooth.certify(xt, n0=100, n=n, alpha=alpha, batch_size=4000)
    assert label == expected
    assert radius < distance
    # the radius is the bound's radius at an estimate of pA within 4 standard deviations of the true pA
    lower = sigma * PHI_INV(lower_confidence_bound(int(n * (p_a - 4 * sd)), n, alpha))
    upper = sigma * PHI_INV(lower_confidence_bound(int(n * (p_a + 4 * sd)), n, alpha))
    assert lower < radius < upper, (lower, radius, upper, distance)
    assert smooth.predict(xt, n=2000, alpha=alpha, batch_size=1000) == expected


# --- reproducibility and bad input ----------------------------------------------------------------------

def test_seeded_and_reproducible() -> None:
    model = Linear2([1.0, 0.0], 0.0)  # a coin flip: the counts show every change of the noise
    a = Smooth(model, 2, 0.25, seed=5).sample_counts(torch.zeros(2), 999, 100)
    b = Smooth(model, 2, 0.25, seed=5).sample_counts(torch.zeros(2), 999, 100)
    c = Smooth(model, 2, 0.25, seed=6).sample_counts(torch.zeros(2), 999, 100)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # per-example generators: the result for example 11 does not depend on what was certified before
    smooth = Smooth(Linear2([1.0, 0.0], 0.05), 2, 0.25)
    first = smooth.certify(torch.zeros(2), 10, 999, 0.01, 100, generator=example_generator(0, 11))
    smooth.certify(torch.zeros(2), 10, 999, 0.01, 100, generator=example_generator(0, 12))
    assert smooth.certify(torch.zeros(2), 10, 999, 0.01, 100, generator=example_generator(0, 11)) == first
    assert example_generator(0, 11).initial_seed() != example_generator(1, 11).initial_seed()
    assert example_generator(0, 11).initial_seed() != example_generator(0, 12).initial_seed()


def test_model_mode_restored_and_no_gradients() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    model.train()
    Smooth(model, 3, 0.25).certify(torch.rand(4), 10, 100, 0.01, 50)
    assert model.training and model[1].training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("call, match", [
    (lambda s, x: s.certify(x, n0=200, n=100, alpha=0.001, batch_size=10), "n0=200 must be <= n=100"),
    (lambda s, x: s.certify(x, n0=10, n=100, alpha=0.0, batch_size=10), "alpha must be in \\(0, 1\\)"),
    (lambda s, x: s.certify(x, n0=10, n=100, alpha=1.5, batch_size=10), "alpha must be in \\(0, 1\\)"),
    (lambda s, x: s.predict(x, n=0, alpha=0.001, batch_size=10), "n must be an integer >= 1"),
    (lambda s, x: s.predict(x, n=10, alpha=0.001, batch_size=0), "batch_size must be an integer >= 1"),
])
def test_bad_arguments(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(Smooth(Constant(1), 10, 0.25), torch.rand(3))


@pytest.mark.parametrize("sigma", [0.0, -0.25, float("nan")])
def test_sigma_must_be_positive(sigma: float) -> None:
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        Smooth(Constant(1), 10, sigma)


def test_wrong_number_of_classes() -> None:
    with pytest.raises(ValueError, match="num_classes=5"):
        Smooth(Constant(1, num_classes=10), 5, 0.25).predict(torch.rand(3), 10, 0.01, 10)
