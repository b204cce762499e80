"""AA: accuracy under AutoAttack (Croce & Hein, ICML 2020; standard version through torchattacks), sharded.

AutoAttack's cost is intrinsic (APGD-CE, APGD-T over 9 target classes, FAB-T and Square's 5,000 queries per
image that resists), so datkit makes sure it adds nothing to it:

1. every worker runs clean inference and the RA attack (PGD) on its shard of the ``indices``; an image that
   is misclassified clean or under PGD counts as broken and goes no further (AutoAttack could only confirm it).
   When the final evaluation has just attacked these images with the same keyed PGD, its per-image outcomes
   (``robust``) are taken instead, and this pass is skipped;
2. the PGD-robust positions are gathered (one ``all_reduce`` of a 0/1 vector) and dealt out again evenly, so
   every worker attacks the same number of images (within one) however the first pass came out;
3. each worker runs AutoAttack on its share in batches of ``batch_size // world_size`` (one batch of a few
   hundred 28x28 images is cheap in memory and keeps the CPU's matrix kernels busy), and the survivors are
   summed with one ``all_reduce``.

AA = survivors / len(indices). PGD's random starts are keyed by (seed, test index), so step 1 does not depend on
the worker count; AutoAttack's own draws (torchattacks' ``seed`` per call) depend on how its batches are cut,
which depends on the worker count: AA is deterministic for a given number of workers and batch size.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from datkit.attacks import Attack
from datkit.data import iterate_batches

from .evaluate import evaluate_per_image, shard_batches


def evaluate_autoattack(backend, model: nn.Module, dataset: Dataset, indices: Sequence[int], batch_size: int,
                        pgd: Attack, autoattack: Attack, seed: int = 0, progress: bool = False,
                        robust: torch.Tensor | None = None) -> dict[str, float]:
    """``{"AA": accuracy under ``autoattack``, "n_aa": len(indices), "n_aa_attacked": images AutoAttack ran on,
    "aa_s": seconds}`` on ``dataset[indices]``, identical on every rank (see the module docstring).

    ``robust``: optional bool per index, True where the image is correct clean and under ``pgd`` (from
    ``evaluate_per_image`` with the same ``seed``); when given, the PGD pass is not run again."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    world, rank = backend.world_size, backend.rank
    try:
        if robust is None:
            robust = _pgd_robust(backend, model, dataset, indices, batch_size, pgd, seed)
        survivors = [idx for idx, r in zip(indices, robust.tolist()) if r]
        batches = shard_batches(survivors, rank, world, batch_size)
        correct = torch.zeros(1, dtype=torch.float64)
        bar = tqdm(total=len(survivors), desc="AutoAttack", leave=False, disable=not (progress and backend.is_main),
                   dynamic_ncols=True)
        for x, y in iterate_batches(dataset, batches):
            x, y = x.to(backend.device), y.to(backend.device)
            x_adv = autoattack(model, x, y)
            with torch.no_grad():
                correct += int((model(x_adv).argmax(1) == y).sum())
            bar.update(len(y) * world)  # every worker attacks the same number of images (within one)
        bar.close()
    finally:
        model.train(was_training)
    correct = backend.all_reduce(correct.to(backend.device), op="sum").cpu()
    n = max(1, len(indices))
    return {"AA": float(correct[0]) / n, "n_aa": len(indices), "n_aa_attacked": len(survivors),
            "aa_s": time.perf_counter() - start}


def _pgd_robust(backend, model: nn.Module, dataset: Dataset, indices: Sequence[int], batch_size: int, pgd: Attack,
                seed: int) -> torch.Tensor:
    """Step 1: bool per index, correct clean and under ``pgd`` (keyed by (seed, index)), identical on every rank."""
    _, per_image = evaluate_per_image(backend, model, dataset, indices, batch_size, {"TA": None, "RA": pgd}, seed)
    return per_image["TA"] & per_image["RA"]
