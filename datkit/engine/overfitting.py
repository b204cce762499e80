"""Catastrophic overfitting check: PGD accuracy on fixed training examples after every epoch.

Single-step adversarial training (FGSM with random start, N-FGSM) can collapse within one epoch: the model
becomes robust to its own one-step attack and loses all robustness to a multi-step one ("catastrophic
overfitting", Wong, Rice & Kolter, "Fast is better than free", ICLR 2020, Sec. 5). Wong et al. detect it by the
PGD accuracy of a training mini-batch and stop early. datkit does the same on ``eval.co_samples`` fixed
training examples (a seeded subset; never the test set, which the run reports on): PGD-10 at ``eval.eps``
(step 2.5*eps/10, random start keyed by (seed, index)), sharded like the rest of evaluation. The check fires
when the accuracy falls more than ``eval.co_drop`` below its best so far; ``eval.co_action`` then stops
training (``stop``) or only records it (``warn``). PGD-based training passes it as well; it costs about
11 forward/backward passes over ``co_samples`` images per epoch.
"""
from __future__ import annotations

from typing import Any

from datkit.attacks import PGD
from datkit.data import eval_subset

from .evaluate import evaluate_accuracy

STEPS = 10


class OverfittingCheck:
    """``check(epoch)`` -> ``(accuracy, fired)``; ``best`` is restored from a resumed run's records."""

    def __init__(self, cfg, backend, model, train_set, records: list[dict[str, Any]]) -> None:
        self.cfg, self.backend, self.model, self.data = cfg, backend, model, train_set
        eps = cfg.eval.eps if cfg.eval.eps is not None else cfg.attack.eps
        self.attack = PGD(eps=eps, alpha=max(2.5 * eps / STEPS, 1e-12), steps=STEPS, random_start=True,
                          norm=cfg.attack.norm, eval_mode=True)
        self.indices = eval_subset(len(train_set), cfg.eval.co_samples, seed=cfg.train.seed + 1)
        self.best = max([r["co_RA"] for r in records if r.get("co_RA") is not None], default=0.0)

    @property
    def enabled(self) -> bool:
        return self.cfg.eval.co_samples > 0

    def check(self) -> tuple[float, bool]:
        """PGD accuracy on the fixed training examples, and whether it fell more than ``eval.co_drop`` below
        the best so far (identical on every rank)."""
        acc = evaluate_accuracy(self.backend, self.model, self.data, self.indices, self.cfg.eval.batch_size,
                                {"co_RA": self.attack}, seed=self.cfg.train.seed)["co_RA"]
        fired = self.best - acc > self.cfg.eval.co_drop
        self.best = max(self.best, acc)
        return acc, fired
