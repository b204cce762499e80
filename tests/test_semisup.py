"""Semi-supervised AT (robust self-training): the labeled/unlabeled split, the mixed batches, pseudo-labels, the
teacher (trained, saved, loaded, resumed), bad input, and 2 workers = 1 worker under torchrun."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datkit.backends.base import Backend
from datkit.config import ConfigError, load_config, validate_for_training, validate_for_world
from datkit.data import MixedBatchSampler, balanced_split
from datkit.preflight import validate_config
from datkit.semisup import pseudo_label
from helpers.runs import TINY, assert_same_weights, describe, load_checkpoint, run_python, train_inprocess

SEMI = ["data.num_labeled=100", "semisup.enabled=true", "semisup.teacher_epochs=2", "train.epochs=1",
        "train.max_steps=3"]


# --- the split -------------------------------------------------------------------------------------------

def test_balanced_split_is_class_balanced_disjoint_and_seeded() -> None:
    labels = torch.arange(10).repeat_interleave(30)  # 10 classes x 30
    lab, unlab = balanced_split(labels, 25, seed=0)
    counts = torch.bincount(labels[torch.as_tensor(lab)], minlength=10)
    assert counts.sum() == 25 and counts.max() - counts.min() <= 1 and counts.min() == 2
    assert len(set(lab) & set(unlab)) == 0 and len(lab) + len(unlab) == 300
    again, _ = balanced_split(labels, 25, seed=0)
    other, _ = balanced_split(labels, 25, seed=1)
    assert list(again) == list(lab) and list(other) != list(lab)


@pytest.mark.parametrize("n", [0, 300, 400])
def test_balanced_split_out_of_range(n: int) -> None:
    with pytest.raises(ConfigError, match="data.num_labeled"):
        balanced_split(torch.arange(10).repeat_interleave(30), n)


def test_balanced_split_class_too_small() -> None:
    labels = torch.tensor([0] * 50 + [1] * 3)
    with pytest.raises(ConfigError, match="class 1 has only 3"):
        balanced_split(labels, 20)


# --- mixed batches ---------------------------------------------------------------------------------------

def test_mixed_batches_hold_the_fraction_and_split_across_workers() -> None:
    n_l, n_u, g = 40, 200, 16
    one = MixedBatchSampler(n_l, n_u, g, 0.75, rank=0, world_size=1, seed=3)
    two = [MixedBatchSampler(n_l, n_u, g, 0.75, rank=r, world_size=2, seed=3) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(2)
    assert len(one) == (n_l + n_u) // g == len(two[0])
    batches = list(one)
    assert len(batches) == len(one)
    for b, b0, b1 in zip(batches, *two):
        assert sum(i < n_l for i in b) == 4 and sum(i >= n_l for i in b) == 12
        assert len(b0) == len(b1) == 8 and sum(i < n_l for i in b0) == 2
        assert sorted(b0 + b1) == sorted(b)  # the two workers' slices are the one worker's batch
        assert len(set(b)) == len(b) and max(b) < n_l + n_u
    # the small labeled part repeats within an epoch, each pass a permutation
    labeled = [i for b in batches for i in b if i < n_l]
    assert sorted(labeled[:n_l]) == list(range(n_l))
    again = MixedBatchSampler(n_l, n_u, g, 0.75, seed=3)
    again.set_epoch(2)
    assert list(again) == batches
    again.set_epoch(3)
    assert list(again) != batches


def test_mixed_batches_reject_an_unsplittable_fraction() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MixedBatchSampler(40, 200, 16, 0.3, world_size=2)  # round(4.8) = 5 pseudo-labeled: odd


# --- pseudo-labels ---------------------------------------------------------------------------------------

class _OneProcess(Backend):
    def setup(self, model, optimizer):
        return model, optimizer


def test_pseudo_labels_are_the_teacher_argmax() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))
    x = torch.rand(23, 1, 4, 4)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(23, dtype=torch.long))
    got = pseudo_label(_OneProcess(), model, ds, batch_size=7)
    assert got.dtype == torch.long and torch.equal(got, model(x).argmax(1))
    assert model.training, "pseudo_label left the model in eval mode"


# --- configuration ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (["semisup.enabled=true"], "data.num_labeled"),
    (["data.num_labeled=-1"], "data.num_labeled"),
    (["semisup.unlabeled_fraction=1.0"], "semisup.unlabeled_fraction"),
    (["semisup.teacher_epochs=0"], "semisup.teacher_epochs"),
])
def test_bad_semisup_config(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(load_config(None, overrides))


def test_teacher_checkpoint_must_exist(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.num_labeled=100", "semisup.enabled=true", f"semisup.teacher={tmp_path / 'none.pt'}"])
    validate_config(cfg)
    with pytest.raises(ConfigError, match="semisup.teacher=.*no such checkpoint"):
        validate_for_training(cfg)


def test_batch_fraction_must_split_over_the_workers() -> None:
    cfg = load_config(None, ["data.num_labeled=100", "semisup.enabled=true", "train.batch_size=32",
                             "semisup.unlabeled_fraction=0.25"])
    validate_config(cfg)
    validate_for_world(cfg, 2)  # 8 + 24
    with pytest.raises(ConfigError, match="semisup.unlabeled_fraction"):
        validate_for_world(cfg, 16)  # 8 pseudo-labeled examples over 16 workers


# --- end to end (in-process, tiny) -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def semi_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("semi")
    train_inprocess([*SEMI, f"train.output_dir={out}"])
    return out


def test_semisup_run_reports_teacher_and_pseudo_labels(semi_run: Path) -> None:
    final = json.loads((semi_run / "results.json").read_text())["final"]
    assert final["num_labeled"] == 100 and final["num_unlabeled"] == 1338  # digits: 1438 training images
    assert (final["teacher_epochs"] == 2 and 0.0 <= final["teacher_TA"] <= 1.0
            and 0.0 <= final["pseudo_label_acc"] <= 1.0)
    teacher = torch.load(semi_run / "teacher.pt", map_location="cpu", weights_only=True)
    assert teacher["teacher"] is True and set(teacher["model"]) == set(load_checkpoint(semi_run)["model"])


def test_loaded_teacher_gives_the_same_run(semi_run: Path, tmp_path: Path) -> None:
    final = train_inprocess([*SEMI, f"semisup.teacher={semi_run / 'teacher.pt'}", f"train.output_dir={tmp_path}"])
    ref = json.loads((semi_run / "results.json").read_text())["final"]
    assert final["pseudo_label_acc"] == ref["pseudo_label_acc"] and final["teacher_TA"] == ref["teacher_TA"]
    assert_same_weights(load_checkpoint(tmp_path)["model"], load_checkpoint(semi_run)["model"], atol=0.0)
    assert not (tmp_path / "teacher.pt").exists()


def test_labeled_only_baseline_uses_the_labeled_part(tmp_path: Path) -> None:
    final = train_inprocess(["data.num_labeled=100", "train.epochs=1", f"train.output_dir={tmp_path}"])
    assert final["num_labeled"] == 100 and final["num_unlabeled_unused"] == 1338
    assert "pseudo_label_acc" not in final


def test_teacher_of_another_model_is_refused(semi_run: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        train_inprocess([*SEMI, "model.kwargs.hidden=16", f"semisup.teacher={semi_run / 'teacher.pt'}",
                         f"train.output_dir={tmp_path}"])
    assert exc.value.code == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_workers_match_one_worker(semi_run: Path, tmp_path: Path) -> None:
    # SGD (see test_distributed): the teacher, its pseudo-labels and the mixed batches are the same on 2 workers
    steps = [*SEMI, "optim.name=sgd", "optim.lr=0.05"]
    one = tmp_path / "one"
    train_inprocess([*steps, f"train.output_dir={one}"])
    two = tmp_path / "two"
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "datkit.train", *TINY,
                       *steps, f"train.output_dir={two}"], cwd=tmp_path, timeout=280)
    assert proc.returncode == 0, describe(proc)
    a, b = (json.loads((one / "results.json").read_text())["final"],
            json.loads((two / "results.json").read_text())["final"])
    assert b["world_size"] == 2 and a["pseudo_label_acc"] == b["pseudo_label_acc"]
    assert_same_weights(load_checkpoint(two)["model"], load_checkpoint(one)["model"], atol=1e-5)
