"""Semi-supervised AT, the training set: teacher -> pseudo-labels -> mixed batches (robust self-training,
Carmon et al. 2019; the DAT paper's Table 3).

With ``data.num_labeled = L > 0`` the training set is split into L labeled examples and the unlabeled
rest (``datkit.data.labeled``); ``semisup.num_unlabeled`` keeps a seeded subset of the rest. With
``semisup.enabled``:

1. the teacher: ``semisup.teacher=train`` trains the run's architecture cleanly on the L labeled examples
   (a run of method ``clean`` through the ``Trainer``, its files in ``output_dir/teacher/``) and rank 0 saves it
   as ``output_dir/teacher.pt`` (a resumed run loads it instead of training again); any other value is a datkit
   checkpoint loaded into that architecture;
2. pseudo-labels: the teacher's argmax on every unlabeled example, the same on every worker;
3. the training set ``[labeled; pseudo-labeled]`` with ``MixedBatchSampler``: ``semisup.unlabeled_fraction``
   of every global batch is pseudo-labeled. The method (pgd, trades, ...) then trains on it as on any data.

Without ``semisup.enabled`` only the L labeled examples are used (the supervised baseline). The teacher's
clean accuracy on the test set and the pseudo-labels' agreement with the true labels (which the unlabeled
part keeps for this report only) are returned for ``results.json``.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from datkit.checkpoint import atomic_save
from datkit.config.errors import ConfigError
from datkit.data import DataBundle, MixedBatchSampler, dataset_labels, eval_subset

from .teacher import load_teacher, pseudo_label, teacher_state

TEACHER = "teacher.pt"
TrainTeacher = Callable[..., "tuple[torch.nn.Module, list[dict[str, Any]]]"]


class Relabeled(Dataset):
    """``(x_i, labels[i])`` for the items of ``base`` (datasets that are not in memory)."""

    def __init__(self, base: Dataset, labels: torch.Tensor) -> None:
        self.base, self.labels = base, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.base[i][0], self.labels[i]


def _tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x, y) of an in-memory dataset (``TensorDataset`` or a ``Subset`` of one), else None."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[0], ds.tensors[1]
    if isinstance(ds, Subset) and isinstance(ds.dataset, TensorDataset):
        idx = torch.as_tensor(ds.indices, dtype=torch.long)
        return ds.dataset.tensors[0][idx], ds.dataset.tensors[1][idx]
    return None


def _combined(labeled: Dataset, unlabeled: Dataset, pseudo: torch.Tensor) -> Dataset:
    """``[labeled; unlabeled with pseudo-labels]`` as one dataset (one TensorDataset when both are in memory)."""
    lt, ut = _tensors(labeled), _tensors(unlabeled)
    if lt is not None and ut is not None:
        return TensorDataset(torch.cat([lt[0], ut[0]]), torch.cat([lt[1].long(), pseudo]))
    return ConcatDataset([labeled, Relabeled(unlabeled, pseudo)])


def _teacher(cfg, backend, data: DataBundle, model: torch.nn.Module, train_teacher: TrainTeacher
             ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train (or load) the teacher, starting from ``model``; returns the teacher and what was done, for the report."""
    ss = cfg.semisup
    saved = os.path.join(cfg.train.output_dir, TEACHER)
    if ss.teacher != "train":
        load_teacher(ss.teacher, model)
        return model, {"teacher": ss.teacher}
    if cfg.train.resume and os.path.isfile(saved):
        load_teacher(saved, model, key="train.resume")  # the teacher a resumed run saved in train.output_dir
        return model, {"teacher": saved, "teacher_resumed": True}
    model, records = train_teacher(cfg, backend, model, data.train, data.test)
    if backend.is_main:
        atomic_save(teacher_state(model, cfg, records), saved)
    backend.barrier()
    return model, {"teacher": saved, "teacher_epochs": len(records), "teacher_final_loss": records[-1]["train_loss"]}


def semisup_training_set(cfg, backend, data: DataBundle, build_model: Callable[..., torch.nn.Module],
                         train_teacher: TrainTeacher) -> tuple[Dataset, MixedBatchSampler | None, dict[str, Any]]:
    """(training set, its batch sampler or None for the default one, report) of this run.

    ``build_model(cfg, spec)`` builds the teacher, ``train_teacher(cfg, backend, model, labeled, test) -> (trained
    model, per-epoch records)`` trains it (``datkit.engine.run``: a ``Trainer`` run of method ``clean``).
    Runs under ``torch.random.fork_rng``: the caller's random
    state (the student's initialization) is the same as in a run without a teacher.
    """
    ss = cfg.semisup
    if not ss.enabled:
        if data.unlabeled is None:
            return data.train, None, {}
        return data.train, None, {"num_labeled": len(data.train), "num_unlabeled_unused": len(data.unlabeled)}
    from datkit.engine.evaluate import evaluate_accuracy

    unlabeled = data.unlabeled
    if unlabeled is None or len(unlabeled) == 0:
        raise ConfigError("semisup.enabled=true: there are no unlabeled examples (set data.num_labeled below the "
                          "training-set size)")
    if 0 < ss.num_unlabeled < len(unlabeled):
        g = torch.Generator().manual_seed(cfg.train.seed)
        unlabeled = Subset(unlabeled, sorted(torch.randperm(len(unlabeled), generator=g)[: ss.num_unlabeled].tolist()))
    with torch.random.fork_rng(devices=[backend.device] if backend.device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed + 7919)
        teacher = build_model(cfg, data.spec).to(backend.device)
        teacher, report = _teacher(cfg, backend, data, teacher, train_teacher)
        pseudo = pseudo_label(backend, teacher, unlabeled, cfg.eval.batch_size)
        idx = eval_subset(len(data.test), cfg.eval.final_num_samples, seed=cfg.train.seed)
        report["teacher_TA"] = evaluate_accuracy(backend, teacher, data.test, idx, cfg.eval.batch_size,
                                                 {"TA": None})["TA"]
    truth = dataset_labels(unlabeled)
    report.update(num_labeled=len(data.train), num_unlabeled=len(unlabeled), unlabeled_fraction=ss.unlabeled_fraction,
                  pseudo_label_acc=float((pseudo == truth).double().mean()))
    sampler = MixedBatchSampler(len(data.train), len(unlabeled), cfg.train.batch_size, ss.unlabeled_fraction,
                                backend.rank, backend.world_size, seed=cfg.train.seed)
    if backend.is_main:
        print(f"datkit: semi-supervised: teacher {report['teacher']} (TA {report['teacher_TA']:.4f}); "
              f"{len(unlabeled)} pseudo-labels ({report['pseudo_label_acc']:.2%} agree with the held-back true "
              f"labels) + {len(data.train)} labeled; {sampler.g_u} of every {cfg.train.batch_size} examples "
              f"pseudo-labeled", flush=True)
    return _combined(data.train, unlabeled, pseudo), sampler, report
