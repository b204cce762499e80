"""Catastrophic overfitting check: PGD accuracy on fixed training examples after every epoch.

Single-step adversarial training (FGSM with random start, N-FGSM) can collapse: the model becomes robust to its
own one-step attack and not at all to a multi-step one ("catastrophic overfitting", Wong, Rice & Kolter, "Fast is
better than free", ICLR 2020, Sec. 5; Andriushchenko & Flammarion, NeurIPS 2020). datkit probes it after every
epoch on ``eval.co_samples`` fixed training examples (a seeded subset; never the test set the run reports on),
sharded like the rest of evaluation, at ``eval.eps``:

- ``co_RA``: accuracy under PGD-10 (step 2.5*eps/10, random start keyed by (seed, index));
- ``co_own``: accuracy under the method's own training attack (``Method.training_attack``, when it has one).

It fires when ``co_RA`` falls more than ``eval.co_drop`` below its best so far (a collapse, Wong et al.'s early
stopping) or lies more than ``eval.co_drop`` below ``co_own`` (robust to its own attack only: a collapse that
happened before the model was ever robust, as FGSM at eps 0.3 on MNIST does within the eps ramp).
``eval.co_action`` then stops training (``stop``) or only records it (``warn``). PGD training passes it; it costs
about 11 + (the training attack's steps + 1) forward/backward passes over ``co_samples`` images per epoch.
"""
from __future__ import annotations

from typing import Any

from datkit.attacks import PGD
from datkit.data import eval_subset

from .evaluate import evaluate_accuracy

STEPS = 10


class OverfittingCheck:
    """``check()`` -> ``(accuracies, why it fired or None)``; ``best`` is restored from a resumed run's records."""

    def __init__(self, cfg, backend, model, train_set, records: list[dict[str, Any]], method=None) -> None:
        self.cfg, self.backend, self.model, self.data = cfg, backend, model, train_set
        eps = cfg.eval.eps if cfg.eval.eps is not None else cfg.attack.eps
        self.attack = PGD(eps=eps, alpha=max(2.5 * eps / STEPS, 1e-12), steps=STEPS, random_start=True,
                          norm=cfg.attack.norm, eval_mode=True)
        self.own = method.training_attack(eps) if method is not None else None
        self.indices = eval_subset(len(train_set), cfg.eval.co_samples, seed=cfg.train.seed + 1)
        self.best = max([r["co_RA"] for r in records if r.get("co_RA") is not None], default=0.0)

    @property
    def enabled(self) -> bool:
        return self.cfg.eval.co_samples > 0

    def check(self) -> tuple[dict[str, float], str | None]:
        """``({"co_RA": PGD accuracy, "co_own": accuracy under the training attack (if any)}, why it fired or None)``
        on the fixed training examples, identical on every rank."""
        attacks = {"co_RA": self.attack, **({"co_own": self.own} if self.own is not None else {})}
        acc = evaluate_accuracy(self.backend, self.model, self.data, self.indices, self.cfg.eval.batch_size, attacks,
                                seed=self.cfg.train.seed)
        out = {k: acc[k] for k in attacks}
        drop, why = self.cfg.eval.co_drop, None
        if self.best - out["co_RA"] > drop:
            why = f"PGD-10 accuracy fell from its best {self.best:.4f} to {out['co_RA']:.4f}"
        elif out.get("co_own") is not None and out["co_own"] - out["co_RA"] > drop:
            why = (f"PGD-10 accuracy {out['co_RA']:.4f} is {out['co_own'] - out['co_RA']:.2f} below the accuracy under "
                   f"the training attack ({out['co_own']:.4f})")
        self.best = max(self.best, out["co_RA"])
        return out, why

    def warning(self, epoch: int, why: str) -> str:
        """The line rank 0 prints when the check fired at ``epoch``: why, what happens next, the remedies."""
        stop = self.cfg.eval.co_action == "stop"
        then = "training stops here (eval.co_action=stop)" if stop else "training goes on (eval.co_action=warn)"
        return (f"datkit: warning: catastrophic overfitting at epoch {epoch} on {len(self.indices)} training "
                f"examples: {why} (eval.co_drop={self.cfg.eval.co_drop}); {then}. Remedies: method.name=nfgsm, a "
                "smaller attack.alpha, a longer attack.eps_warmup_epochs, or method.name=pgd")
