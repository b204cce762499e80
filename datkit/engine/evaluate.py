"""Sharded evaluation: TA (clean accuracy) and RA (accuracy under PGD) of the unwrapped model.

Each worker evaluates its share of the indices (``shard_batches``) and the correct counts, with which images
were correct, are summed with one ``all_reduce``, so evaluation is split across workers, not repeated on each.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

from datkit import randomness
from datkit.attacks import PGD, Attack
from datkit.data import iterate_batches, shard_range


def ra_attack(eval_cfg, train_eps: float, norm: str = "linf") -> PGD:
    """The RA attack of ``eval_cfg``: PGD-``pgd_steps`` with ``pgd_restarts`` at ``eval.eps`` (or the training eps)."""
    eps = eval_cfg.eps if eval_cfg.eps is not None else train_eps
    alpha = eval_cfg.pgd_alpha if eval_cfg.pgd_alpha is not None else 2.5 * eps / eval_cfg.pgd_steps
    return PGD(eps=eps, alpha=max(alpha, 1e-12), steps=eval_cfg.pgd_steps, random_start=True, norm=norm,
               restarts=eval_cfg.pgd_restarts, eval_mode=True)


def shard_batches(items: list[int], rank: int, world_size: int, batch_size: int) -> list[list[int]]:
    """This rank's share of ``items`` (``shard_range``: shares differ by at most one), cut into batches of
    ``batch_size // world_size`` (``batch_size`` is global)."""
    mine = [items[i] for i in shard_range(len(items), rank, world_size)]
    local_bs = max(1, batch_size // world_size)
    return [mine[i : i + local_bs] for i in range(0, len(mine), local_bs)]


@runtime_checkable
class Metric(Protocol):
    """An evaluation column that is not an attack (e.g. verified accuracy): ``correct(model, x, y)`` is the
    number of examples of the batch that count as correct. ``complement`` (optional) names a second
    column reported as ``1 - accuracy`` (verified error).

    Extra columns (optional): a metric with ``columns`` (a tuple of names, the same on every rank) is called as
    ``correct_columns(model, x, y) -> (count, {name: sum over the batch})`` instead; the sums are reduced with
    the counts, and ``summarize(sums, accuracy, record)`` (when defined; else ``sum / n``) turns them into the
    columns added to the record (``record`` holds the reduced accuracies and ``n``)."""

    def correct(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int: ...


def _columns(entry: Attack | Metric | None) -> tuple[str, ...]:
    return tuple(getattr(entry, "columns", ())) if isinstance(entry, Metric) else ()


def _hits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, entry: Attack | Metric | None
          ) -> torch.Tensor | int | tuple[int, dict[str, float]]:
    """Per-image correctness (bool vector) clean (None) or under an attack; a metric's count (int), with its
    extra columns' sums when it has some."""
    if isinstance(entry, Metric):
        if _columns(entry):
            count, sums = entry.correct_columns(model, x, y)
            return int(count), sums
        return int(entry.correct(model, x, y))
    return _correct_mask(model, x if entry is None else entry(model, x, y), y)


@torch.no_grad()
def _correct_mask(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def evaluate_accuracy(backend, model: nn.Module, dataset: Dataset, indices: Sequence[int], batch_size: int,
                      attacks: dict[str, Attack | Metric | None], seed: int = 0) -> dict[str, float]:
    """Accuracy of ``model`` on ``dataset[indices]`` for each entry of ``attacks`` (None = clean, an attack,
    or a :class:`Metric`; a metric's ``complement`` column is added as ``1 - accuracy``).

    The attacks' random starts are keyed by (``seed``, test index) (``datkit.randomness``): the result does not
    depend on the number of workers or the batch size.

    Returns ``{name: accuracy}`` plus ``n``, identical on every rank.
    """
    return evaluate_per_image(backend, model, dataset, indices, batch_size, attacks, seed)[0]


def evaluate_per_image(backend, model: nn.Module, dataset: Dataset, indices: Sequence[int], batch_size: int,
                       attacks: dict[str, Attack | Metric | None], seed: int = 0
                       ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """:func:`evaluate_accuracy`'s record and, for the clean and attack columns (not metrics), which images were
    correct: ``{name: bool tensor aligned with indices}``, identical on every rank (one ``all_reduce`` carries the
    counts and the per-image outcomes). :func:`subset_accuracy` reads a subset's accuracy from them, and the AA
    pass takes its PGD filter from them instead of attacking the same images again."""
    was_training = model.training
    model.eval()
    batches = shard_batches(list(indices), backend.rank, backend.world_size, batch_size)
    position = {idx: k for k, idx in enumerate(indices)}
    counts = torch.zeros(len(attacks) + 1, dtype=torch.float64)
    columns = [(name, c) for name, entry in attacks.items() for c in _columns(entry)]  # metrics' extra sums
    sums = torch.zeros(len(columns), dtype=torch.float64)
    slot = {key: j for j, key in enumerate(columns)}
    hits = torch.zeros(len(attacks), len(indices), dtype=torch.float64)
    try:
        for batch, (x, y) in zip(batches, iterate_batches(dataset, batches)):
            x, y = x.to(backend.device), y.to(backend.device)
            where = torch.tensor([position[i] for i in batch], dtype=torch.long)
            for k, (name, atk) in enumerate(attacks.items()):
                with randomness.keyed(randomness.sample_keys(seed, randomness.EVAL_STREAM, batch)):
                    got = _hits(model, x, y, atk)
                if isinstance(got, tuple):
                    got, extra = got
                    for c in _columns(atk):
                        sums[slot[name, c]] += float(extra.get(c, 0.0))
                if isinstance(got, int):
                    counts[k] += got
                else:
                    counts[k] += int(got.sum())
                    hits[k, where] = got.cpu().to(torch.float64)
            counts[-1] += len(y)
    finally:
        model.train(was_training)
    flat = backend.all_reduce(torch.cat([counts, sums, hits.flatten()]).to(backend.device), op="sum").cpu()
    counts, sums = flat[: len(counts)], flat[len(counts): len(counts) + len(sums)]
    hits = flat[len(counts) + len(sums):].view(len(attacks), len(indices))
    n = max(1.0, float(counts[-1]))
    out = {name: float(counts[k]) / n for k, name in enumerate(attacks)}
    for name, entry in attacks.items():
        if isinstance(entry, Metric) and getattr(entry, "complement", None):
            out[entry.complement] = 1.0 - out[name]
    out["n"] = int(counts[-1])
    for name, entry in attacks.items():
        if _columns(entry):
            mine = {c: float(sums[slot[name, c]]) for c in _columns(entry)}
            summarize = getattr(entry, "summarize", None)
            out.update(summarize(mine, out[name], dict(out)) if summarize else {c: v / n for c, v in mine.items()})
    per_image = {name: hits[k] > 0.5 for k, (name, entry) in enumerate(attacks.items())
                 if not isinstance(entry, Metric)}
    return out, per_image


def subset_outcomes(per_image: dict[str, torch.Tensor], indices: Sequence[int], subset: Sequence[int]
                    ) -> dict[str, torch.Tensor] | None:
    """:func:`evaluate_per_image`'s outcomes on ``indices`` restricted to ``subset`` (in its order); None when
    ``subset`` is not inside ``indices``."""
    position = {idx: k for k, idx in enumerate(indices)}
    if not subset or any(i not in position for i in subset):
        return None
    where = torch.tensor([position[i] for i in subset], dtype=torch.long)
    return {name: hit[where] for name, hit in per_image.items()}


def subset_accuracy(per_image: dict[str, torch.Tensor], indices: Sequence[int], subset: Sequence[int]
                    ) -> dict[str, float] | None:
    """``{name: accuracy, "n"}`` on ``subset`` read from :func:`evaluate_per_image`'s outcomes on ``indices``;
    None when ``subset`` is not inside ``indices``."""
    hits = subset_outcomes(per_image, indices, subset)
    if hits is None:
        return None
    return {**{name: float(hit.double().mean()) for name, hit in hits.items()}, "n": len(subset)}
