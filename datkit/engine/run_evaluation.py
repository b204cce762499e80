"""The evaluations a training run makes: the per-epoch subset, the final evaluation (run once) and AutoAttack.

``RunEvaluation`` is the part of the :class:`~datkit.engine.trainer.Trainer` that evaluates its model: TA, RA (the
attack of ``datkit.engine.evaluate.ra_attack``) and the method's own columns (e.g. verified accuracy) on a seeded
test subset, sharded over the workers (``datkit.engine.evaluate.evaluate_per_image``); AA on ``eval.aa_samples``
images after the RA attack filtered them (``datkit.engine.autoattack_eval``).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from datkit.data import eval_subset

from .evaluate import evaluate_per_image, ra_attack, subset_accuracy, subset_outcomes


class RunEvaluation:
    """Evaluates ``model`` (the unwrapped model) of a run on ``data.test``; ``ra`` is the RA column's attack."""

    def __init__(self, cfg: Any, backend: Any, model: torch.nn.Module, data: Any, method: Any) -> None:
        self.cfg, self.backend, self.model, self.data, self.method = cfg, backend, model, data, method
        self.ra = ra_attack(cfg.eval, cfg.attack.eps, cfg.attack.norm)  # the RA column's attack
        # final(): (seconds, indices, record, per-image outcomes), once it ran
        self.final_evaluation: tuple[float, list[int], dict[str, float], dict[str, torch.Tensor]] | None = None

    def evaluate(self, num_samples: int) -> tuple[list[int], dict[str, float], dict[str, torch.Tensor]]:
        """(the test indices, TA / RA / the method's own columns (e.g. verified accuracy), which images were correct
        clean and under the RA attack) on a fixed test subset of ``num_samples`` (0 = all)."""
        idx = eval_subset(len(self.data.test), num_samples, seed=self.cfg.train.seed)
        columns = {"TA": None, **({"RA": self.ra} if self.cfg.eval.robust else {}), **self.method.eval_metrics()}
        ev, per_image = evaluate_per_image(self.backend, self.model, self.data.test, idx, self.cfg.eval.batch_size,
                                           columns, seed=self.cfg.train.seed)
        return idx, ev, per_image

    def epoch_evaluation(self, epoch: int) -> dict[str, float]:
        """The per-epoch evaluation (``eval.num_samples``). At the last epoch the final evaluation runs here instead
        (kept for ``final``) and the per-epoch subset's columns are read from its per-image outcomes, when the
        subset lies inside it and the method adds no metric column: the same keyed attacks on the same images,
        not attacked twice."""
        cfg = self.cfg
        if epoch == cfg.train.epochs and not self.method.eval_metrics():
            _, idx, _, per_image = self.final()
            subset = eval_subset(len(self.data.test), cfg.eval.num_samples, seed=cfg.train.seed)
            ev = subset_accuracy(per_image, idx, subset)
            if ev is not None:
                return ev
        return self.evaluate(cfg.eval.num_samples)[1]

    def final(self) -> tuple[float, list[int], dict[str, float], dict[str, torch.Tensor]]:
        """The final evaluation (``eval.final_num_samples``), run once: (seconds, indices, record, per-image)."""
        if self.final_evaluation is None:
            t0 = time.perf_counter()
            idx, ev, per_image = self.evaluate(self.cfg.eval.final_num_samples)
            self.final_evaluation = (time.perf_counter() - t0, idx, ev, per_image)
        return self.final_evaluation

    def autoattack(self, final_idx: list[int], per_image: dict[str, torch.Tensor]) -> dict[str, Any]:
        """AA on ``eval.aa_samples`` test examples (seeded subset), after the RA attack filtered them
        (``datkit.engine.autoattack_eval``; the final evaluation's outcomes when it covered them):
        ``{"AA", "n_aa", "n_aa_attacked", "aa_s"}``."""
        from datkit.attacks import AutoAttack

        from .autoattack_eval import evaluate_autoattack

        cfg = self.cfg
        idx = eval_subset(len(self.data.test), cfg.eval.aa_samples, seed=cfg.train.seed)
        known = subset_outcomes(per_image, final_idx, idx)  # the final evaluation attacked them already
        robust = known["TA"] & known["RA"] if known is not None and "RA" in known else None
        aa = AutoAttack(self.ra.eps, cfg.attack.norm, version="standard", n_classes=self.data.spec.num_classes,
                        seed=cfg.train.seed)
        return evaluate_autoattack(self.backend, self.model, self.data.test, idx, cfg.eval.batch_size, self.ra, aa,
                                   seed=cfg.train.seed, progress=cfg.log.progress, robust=robust)
