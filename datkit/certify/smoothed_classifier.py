"""Randomized smoothing: prediction and l2 certification of a smoothed classifier.

Cohen, Rosenfeld and Kolter, "Certified Adversarial Robustness via Randomized Smoothing" (ICML 2019),
Algorithms ``PREDICT`` and ``CERTIFY``; after ``locuslab/smoothing``'s ``core.py``.

The smoothed classifier of a base classifier ``f`` is

    g(x) = argmax_c P(f(x + e) = c),   e ~ N(0, sigma^2 I).

If the top class ``cA`` has probability ``pA >= pA_lower > 1/2``, then ``g(x + d) = cA`` for every
``||d||_2 < R = sigma * Phi^-1(pA_lower)`` (Cohen et al., Theorem 1 with ``pB <= 1 - pA_lower``).
``certify`` estimates ``pA_lower`` by Monte Carlo with a one-sided Clopper-Pearson bound, so the
returned radius is sound with probability at least ``1 - alpha`` over the noise.

Inputs: one example without a batch dimension (e.g. ``(C, H, W)`` in [0, 1] pixel units; noise is added
before the model's built-in normalization, and the noisy input is not clipped). ``sigma`` is in the
same units. The noise comes from a ``torch.Generator``: seeded, so results are reproducible.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import nn


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1) (the failure probability, e.g. 0.001), got {alpha!r}")
    return float(alpha)


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from k successes in n Binomial(n, p) trials.

    ``Beta(alpha; k, n - k + 1)`` quantile (0 when k = 0): the lower end of SciPy's exact two-sided
    interval at level ``1 - 2*alpha`` (``binomtest(k, n).proportion_ci(1 - 2*alpha, method="exact")``).
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    return 0.0 if k == 0 else float(beta.ppf(_check_alpha(alpha), k, n - k + 1))


def certified_radius(sigma: float, p_lower: float) -> float:
    """l2 radius ``sigma * Phi^-1(p_lower)`` certified when the top class has probability >= p_lower > 1/2."""
    return float(sigma * norm.ppf(p_lower))


def example_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, index) only: the noise of example ``index`` is the same on every
    worker, in every batch position, for any number of workers (numpy's SeedSequence mixes the pair)."""
    state = int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state)


class Smooth:
    """The smoothed classifier ``g`` of ``model`` under Gaussian noise N(0, sigma^2 I).

    Args:
        model: base classifier mapping a batch ``(B, *x.shape)`` to logits ``(B, num_classes)``; it is
            put in eval mode while sampling (its mode is restored afterwards).
        num_classes: number of classes (>= 2).
        sigma: noise standard deviation (> 0), in input units.
        seed: seed of the generator used when ``predict``/``certify`` get none (None: nondeterministic).

    ``predict`` and ``certify`` return :attr:`ABSTAIN` (-1) when they cannot decide at level ``alpha``.
    """

    ABSTAIN: int = -1

    def __init__(self, model: nn.Module, num_classes: int, sigma: float, seed: int | None = 0) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0 (the noise std in input units), got {sigma!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.model, self.num_classes, self.sigma, self.seed = model, int(num_classes), float(sigma), seed
        self._generators: dict[torch.device, torch.Generator] = {}

    # --- the two algorithms -------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> int:
        """Cohen et al.'s PREDICT: the top class of ``n`` noisy samples, or ABSTAIN.

        The two most frequent classes (counts nA >= nB) are compared by a two-sided binomial test of
        ``nA ~ Binomial(nA + nB, 1/2)``; if its p-value exceeds ``alpha``, abstain. The class returned
        differs from ``g(x)`` with probability at most ``alpha``.
        """
        n, alpha = _positive_int("n", n), _check_alpha(alpha)
        counts = self.sample_counts(x, n, batch_size, generator)
        order = np.argsort(-counts, kind="stable")
        n_a, n_b = int(counts[order[0]]), int(counts[order[1]])
        if binomtest(n_a, n_a + n_b, p=0.5).pvalue > alpha:
            return self.ABSTAIN
        return int(order[0])

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                generator: torch.Generator | None = None) -> tuple[int, float]:
        """Cohen et al.'s CERTIFY: ``(class, l2 radius)``, or ``(ABSTAIN, 0.0)``.

        ``n0`` samples select the candidate class ``cA`` (their argmax); ``n`` further samples estimate
        it: ``pA_lower = LowerConfBound(nA, n, 1 - alpha)`` (Clopper-Pearson). If ``pA_lower < 1/2``,
        abstain; else return ``cA`` and ``R = sigma * Phi^-1(pA_lower)``. With probability >= 1 - alpha
        the smoothed classifier ``g`` predicts ``cA`` everywhere in the l2 ball of radius ``R``.
        """
        n0, n, alpha = _positive_int("n0", n0), _positive_int("n", n), _check_alpha(alpha)
        if n0 > n:
            raise ValueError(f"n0={n0} must be <= n={n} (n0 samples select the class, n estimate its probability)")
        generator = self._generator(x.device) if generator is None else generator
        c_a = int(np.argmax(self.sample_counts(x, n0, batch_size, generator)))
        n_a = int(self.sample_counts(x, n, batch_size, generator)[c_a])
        p_lower = lower_confidence_bound(n_a, n, alpha)
        if p_lower < 0.5:
            return self.ABSTAIN, 0.0
        return c_a, certified_radius(self.sigma, p_lower)

    # --- Monte Carlo sampling ------------------------------------------------------------------------
    @torch.no_grad()
    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int,
                      generator: torch.Generator | None = None) -> np.ndarray:
        """How often the base classifier predicts each class on ``num`` samples of ``x + N(0, sigma^2)``.

        Noise is drawn in batches of ``batch_size`` from ``generator`` (default: this object's seeded one);
        the same generator state, ``num`` and ``batch_size`` give the same counts.
        """
        num, batch_size = _positive_int("num", num), _positive_int("batch_size", batch_size)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError("x must be one floating-point example (no batch dimension), "
                             f"got {getattr(x, 'dtype', type(x))}")
        generator = self._generator(x.device) if generator is None else generator
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            remaining = num
            while remaining > 0:
                b = min(batch_size, remaining)
                noise = torch.randn((b, *x.shape), generator=generator, device=generator.device, dtype=x.dtype)
                logits = self.model(x.unsqueeze(0) + noise.to(x.device) * self.sigma)
                if logits.dim() != 2 or logits.shape[1] != self.num_classes:
                    raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; expected "
                                     f"({b}, {self.num_classes}) (num_classes={self.num_classes})")
                counts += torch.bincount(logits.argmax(1), minlength=self.num_classes)
                remaining -= b
        finally:
            for module, training in modes:
                module.training = training
        return counts.cpu().numpy()

    def _generator(self, device: torch.device) -> torch.Generator:
        """This object's generator for ``device`` (seeded with ``seed`` on first use)."""
        if device not in self._generators:
            g = torch.Generator(device=device)
            if self.seed is None:
                g.seed()
            else:
                g.manual_seed(int(self.seed))
            self._generators[device] = g
        return self._generators[device]
