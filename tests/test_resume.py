"""Checkpoints and resume: a resumed run reproduces the uninterrupted one; checkpoint files are written atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers.runs import assert_same_weights, load_checkpoint, train_inprocess

from datkit import checkpoint as ckpt
from datkit.engine import Trainer

# 2 steps per epoch keeps 4 epochs fast; eval every epoch.
RUN = ["train.max_steps=2", "train.batch_size=32", "train.checkpoint_every=1"]


def _epochs(out: Path) -> list[int]:
    return [r["epoch"] for r in json.loads((out / "results.json").read_text())["epochs"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Checkpoints of uninterrupted 4-epoch runs, keyed by schedule name."""
    out = {}
    for schedule in ("constant", "cosine"):
        d = tmp_path_factory.mktemp(f"full_{schedule}")
        train_inprocess([*RUN, f"schedule.name={schedule}", "train.epochs=4", f"train.output_dir={d}"])
        out[schedule] = load_checkpoint(d)
        out[schedule]["dir"] = d
    return out


@pytest.mark.slow
def test_resume_with_more_epochs_reproduces_the_uninterrupted_run(uninterrupted: dict, tmp_path: Path) -> None:
    # train.epochs=2, then train.epochs=4 resume=true. The lr schedule must not depend on train.epochs for
    # the two runs to agree, hence schedule=constant (a cosine schedule over 2 epochs is a different run).
    common = [*RUN, "schedule.name=constant", f"train.output_dir={tmp_path}"]
    first = train_inprocess([*common, "train.epochs=2"])
    assert first["epochs"] == 2
    assert load_checkpoint(tmp_path)["epoch"] == 2
    final = train_inprocess([*common, "train.epochs=4", "train.resume=true"])
    assert final["epochs"] == 4

    resumed, full = load_checkpoint(tmp_path), uninterrupted["constant"]
    assert resumed["epoch"] == full["epoch"] == 4
    assert_same_weights(resumed["model"], full["model"], atol=1e-6)
    assert _epochs(tmp_path) == [1, 2, 3, 4]
    assert [r["epoch"] for r in resumed["records"]] == [1, 2, 3, 4]
    for r_res, r_full in zip(resumed["records"], full["records"]):
        assert r_res["train_loss"] == pytest.approx(r_full["train_loss"], abs=1e-6), r_res["epoch"]
        assert r_res["TA"] == pytest.approx(r_full["TA"]), r_res["epoch"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


class _Interrupt(Exception):
    pass


def _run_dying_at(args: list[str], dying_epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``args`` in-process, killed (an exception) at the start of epoch ``dying_epoch``."""
    real_train_epoch = Trainer.train_epoch

    def dying(self, epoch: int):
        if epoch == dying_epoch:
            raise _Interrupt("killed")
        return real_train_epoch(self, epoch)

    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "train_epoch", dying)
        with pytest.raises(_Interrupt):
            train_inprocess(args)


@pytest.mark.slow
def test_resume_after_a_crash_reproduces_the_uninterrupted_run(uninterrupted: dict, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The same config throughout (default cosine schedule); the first run dies at the start of epoch 3.
    args = [*RUN, "schedule.name=cosine", "train.epochs=4", f"train.output_dir={tmp_path}"]
    _run_dying_at(args, 3, monkeypatch)
    assert load_checkpoint(tmp_path)["epoch"] == 2
    assert not (tmp_path / "results.json").exists()

    final = train_inprocess([*args, "train.resume=true"])
    resumed, full = load_checkpoint(tmp_path), uninterrupted["cosine"]
    assert_same_weights(resumed["model"], full["model"], atol=1e-6)
    assert resumed["optimizer"]["state"].keys() == full["optimizer"]["state"].keys()
    assert resumed["scheduler"]["last_epoch"] == full["scheduler"]["last_epoch"] == 8
    assert _epochs(tmp_path) == [1, 2, 3, 4]
    full_final = json.loads((uninterrupted["cosine"]["dir"] / "results.json").read_text())["final"]
    assert final["TA"] == pytest.approx(full_final["TA"]) and final["n"] == full_final["n"]


@pytest.mark.slow
def test_resume_without_checkpoint_starts_from_scratch(uninterrupted: dict, tmp_path: Path) -> None:
    train_inprocess([*RUN, "schedule.name=constant", "train.epochs=4", "train.resume=true", f"train.output_dir={tmp_path}"])
    assert_same_weights(load_checkpoint(tmp_path)["model"], uninterrupted["constant"]["model"], atol=1e-6)
    assert _epochs(tmp_path) == [1, 2, 3, 4]


def test_checkpoint_contents_load_with_weights_only(uninterrupted: dict) -> None:
    d = uninterrupted["constant"]["dir"]
    state = torch.load(d / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert {"epoch", "model", "optimizer", "scheduler", "records", "config", "world_size"} <= set(state)
    assert all(isinstance(v, torch.Tensor) for v in state["model"].values())
    assert isinstance(state["config"], str) and "cnn_small" in state["config"]
    assert ckpt.load_checkpoint_file(str(d / "checkpoint_last.pt"))["epoch"] == 4


def test_load_checkpoint_file_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint_file(str(tmp_path / "none.pt"))


# --- atomic_save --------------------------------------------------------------------------------------

def test_atomic_save_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ck.pt"
    ckpt.atomic_save({"w": torch.arange(4.0)}, str(path))
    ckpt.atomic_save({"w": torch.arange(5.0)}, str(path))
    assert sorted(os.listdir(path.parent)) == ["ck.pt"]
    assert torch.equal(ckpt.load_checkpoint_file(str(path))["w"], torch.arange(5.0))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ck.pt"
    ckpt.atomic_save({"w": torch.ones(3)}, str(path))
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # some bytes reach the disk, then the job dies
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_save({"w": torch.zeros(3)}, str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(ckpt.load_checkpoint_file(str(path))["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"], "the temporary file was left behind"


@pytest.mark.slow
def test_resume_from_an_older_checkpoint_lists_each_epoch_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # checkpoint every 2 epochs; the run dies in epoch 4, after epoch 3 was logged but not checkpointed.
    # Resuming repeats epoch 3: metrics.jsonl must then hold epochs 1..4 once each, like results.json.
    args = [*RUN, "schedule.name=constant", "train.epochs=4", "train.checkpoint_every=2", f"train.output_dir={tmp_path}"]
    _run_dying_at(args, 4, monkeypatch)
    assert load_checkpoint(tmp_path)["epoch"] == 2
    train_inprocess([*args, "train.resume=true"])
    assert _epochs(tmp_path) == [1, 2, 3, 4]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
