"""Checkpoints and resume: a resumed run reproduces the uninterrupted one; checkpoint files are written atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from datkit import checkpoint as ckpt
from datkit.engine import Trainer
from helpers.runs import assert_same_weights, load_checkpoint, train_inprocess

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
    train_inprocess([*RUN, "schedule.name=constant", "train.epochs=4", "train.resume=true",
                     f"train.output_dir={tmp_path}"])
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
    args = [*RUN, "schedule.name=constant", "train.epochs=4", "train.checkpoint_every=2",
            f"train.output_dir={tmp_path}"]
    _run_dying_at(args, 4, monkeypatch)
    assert load_checkpoint(tmp_path)["epoch"] == 2
    train_inprocess([*args, "train.resume=true"])
    assert _epochs(tmp_path) == [1, 2, 3, 4]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


# --- mid-epoch checkpoints (train.checkpoint_every_steps) and preemption signals -------------------------------

_TIMING = ("T_s", "C_s", "eval_s")


def _same_records(a: list[dict], b: list[dict]) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for r_a, r_b in zip(a, b):
        assert {k: v for k, v in r_a.items() if k not in _TIMING} == {k: v for k, v in r_b.items() if k not in _TIMING}


@pytest.mark.slow
def test_mid_epoch_resume_after_a_crash_reproduces_the_uninterrupted_run(uninterrupted: dict, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # checkpoint_every_steps=5 counts from the run's start: after step 0 of epoch 3 (2 steps per epoch); the run
    # dies (an exception) in step 1 of epoch 3; no epoch-end checkpoint before the last (checkpoint_every=0).
    args = [*RUN, "schedule.name=cosine", "train.epochs=4", "train.checkpoint_every=0",
            "train.checkpoint_every_steps=5", f"train.output_dir={tmp_path}"]
    real_step = Trainer.train_step

    def dying(self, *a, **kw):
        if self.position == (3, 1):
            raise _Interrupt("killed")
        return real_step(self, *a, **kw)

    import signal
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as mp:
        mp.setattr(Trainer, "train_step", dying)
        with pytest.raises(_Interrupt):
            train_inprocess(args)
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    cut = load_checkpoint(tmp_path)  # weights_only=True
    assert cut["epoch"] == 2 and cut["mid_epoch"]["epoch"] == 3 and cut["mid_epoch"]["next_step"] == 1
    assert cut["scheduler"]["last_epoch"] == 5 and len(cut["mid_epoch"]["ranks"]["rng"]) == 1

    final = train_inprocess([*args, "train.resume=true"])
    resumed, full = load_checkpoint(tmp_path), uninterrupted["cosine"]
    assert_same_weights(resumed["model"], full["model"], atol=0.0)
    assert "mid_epoch" not in resumed and resumed["epoch"] == 4
    _same_records(resumed["records"], full["records"])
    full_final = json.loads((full["dir"] / "results.json").read_text())["final"]
    assert final["TA"] == full_final["TA"] and final["RA"] == full_final["RA"]


@pytest.mark.slow
def test_sigterm_in_process_checkpoints_mid_epoch_exits_75_and_resumes_exactly(
        uninterrupted: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import signal

    from datkit.engine.preemption import EXIT_PREEMPTED, Preempted

    args = [*RUN, "schedule.name=constant", "train.epochs=4", f"train.output_dir={tmp_path}"]
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as mp:
        mp.setenv("DATKIT_TEST_SIGNAL_AT_STEP", "0:2:1")  # before the last step of epoch 2
        mp.setenv("DATKIT_TEST_SIGNAL", "TERM")
        with pytest.raises(Preempted) as stop:
            train_inprocess(args)
    assert stop.value.code == EXIT_PREEMPTED == 75
    assert signal.getsignal(signal.SIGTERM) == before
    assert ("datkit: got SIGTERM on rank 0: checkpoint after epoch 2 step 1 written to "
            f"{tmp_path / 'checkpoint_last.pt'}; exit 75 (requeue and resume with train.resume=true)"
            in capsys.readouterr().out)
    cut = load_checkpoint(tmp_path)
    # the epoch's last step was trained: the checkpoint is mid-epoch (its evaluation and record are still to come)
    assert (cut["epoch"], cut["mid_epoch"]["epoch"], cut["mid_epoch"]["next_step"]) == (1, 2, 2)
    assert not (tmp_path / "results.json").exists()

    train_inprocess([*args, "train.resume=true"])
    resumed, full = load_checkpoint(tmp_path), uninterrupted["constant"]
    assert_same_weights(resumed["model"], full["model"], atol=0.0)
    _same_records(resumed["records"], full["records"])
    assert _epochs(tmp_path) == [1, 2, 3, 4]
