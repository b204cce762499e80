"""``train.nonfinite``: a NaN/Inf loss or gradient is found on every worker at the same step.

- one worker (in-process): ``stop`` exits with code 4 naming epoch/step/rank; ``skip`` drops the step,
  counts it in results.json and keeps the weights finite; ``max_nonfinite_skips`` consecutive skips stop;
  bad values of the keys fail at start-up;
- two workers: ``stop`` under torchrun, horovodrun and deepspeed -- both ranks print the same epoch, step
  and rank and exit with code 4; ``skip`` under torchrun with onebit compression (the NaN is caught before
  compression, where the decoded average would be finite garbage, and the error-feedback residuals do not
  carry it into the next steps).

NaNs are injected with the test-only hook ``DATKIT_TEST_NAN_AT_STEP=rank:epoch:step`` (the loss of that
rank at that step is multiplied by NaN, so its gradients are NaN too).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers.runs import TINY, describe, load_checkpoint, run_python, train_inprocess

from datkit.config import ConfigError, load_config
from datkit.preflight import validate_config

RUN = ["train.epochs=2", "train.max_steps=3", "optim.name=sgd", "optim.lr=0.05", "schedule.name=constant"]


def test_bad_nonfinite_keys_fail_at_start_up() -> None:
    cfg = load_config(None, ["train.nonfinite=continue", "train.max_nonfinite_skips=0", "dist.peer_timeout_s=0.5"])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    msg = str(err.value)
    assert "train.nonfinite='continue' is not one of: stop, skip, ignore" in msg
    assert "train.max_nonfinite_skips=0 must be >= 1" in msg
    assert "dist.peer_timeout_s=0.5 must be >= 1.0" in msg
    validate_config(load_config(None, ["dist.peer_timeout_s=0"]))  # 0 = the watch is off


def test_stop_exits_4_naming_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("DATKIT_TEST_NAN_AT_STEP", "0:2:1")
    with pytest.raises(SystemExit) as exit_:
        train_inprocess([*RUN, f"train.output_dir={tmp_path}"])
    assert exit_.value.code == 4
    assert ("datkit: non-finite loss/gradient at epoch 2 step 1 on rank(s) 0; stopping (train.nonfinite=stop)"
            in capsys.readouterr().err)
    assert load_checkpoint(tmp_path)["epoch"] == 1  # the last complete checkpoint stays
    assert not (tmp_path / "results.json").exists()


def test_skip_drops_the_step_and_counts_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("DATKIT_TEST_NAN_AT_STEP", "0:1:1,0:2:0")
    final = train_inprocess([*RUN, "train.nonfinite=skip", f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert "at epoch 1 step 1 on rank(s) 0; step skipped (train.nonfinite=skip" in err
    assert "at epoch 2 step 0 on rank(s) 0; step skipped" in err
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["nonfinite_skipped"] for r in results["epochs"]] == [1, 1] and final["nonfinite_skipped"] == 2
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in results["epochs"])  # skipped losses left out
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path)["model"].values())


def test_skip_stops_after_max_consecutive_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("DATKIT_TEST_NAN_AT_STEP", "0:1:0,0:1:1")
    with pytest.raises(SystemExit) as exit_:
        train_inprocess([*RUN, "train.nonfinite=skip", "train.max_nonfinite_skips=2", f"train.output_dir={tmp_path}"])
    assert exit_.value.code == 4
    assert ("at epoch 1 step 1 on rank(s) 0; stopping after 2 consecutive skipped steps (train.max_nonfinite_skips=2)"
            in capsys.readouterr().err)


def test_ignore_lets_the_nan_into_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: without the check, the same NaN does reach the weights (so the tests above can fail)."""
    monkeypatch.setenv("DATKIT_TEST_NAN_AT_STEP", "0:1:1")
    train_inprocess([*RUN, "train.epochs=1", "train.nonfinite=ignore", f"train.output_dir={tmp_path}"])
    assert not all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path)["model"].values())


# --- two workers -----------------------------------------------------------------------------------------
STOP = r"datkit: non-finite loss/gradient at epoch 1 step 2 on rank\(s\) 1; stopping \(train.nonfinite=stop\) \[rank {}\]"


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("backend", ["torch", "horovod", "deepspeed"])
def test_stop_on_two_workers_at_the_same_step(backend: str, tmp_path: Path) -> None:
    from test_faults import launch_cmd, remove_deepspeed_shm

    tiny = [a for a in TINY if not a.startswith("backend=")]
    cmd = launch_cmd(backend)
    try:
        proc = run_python([*cmd, *tiny, *RUN, f"train.output_dir={tmp_path / 'out'}"], cwd=tmp_path, timeout=300,
                          DATKIT_TEST_NAN_AT_STEP="1:1:2")
    finally:
        remove_deepspeed_shm(cmd)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, describe(proc)
    for rank in (0, 1):  # both ranks, the same epoch and step, naming rank 1
        assert re.search(STOP.format(rank), text), describe(proc)
    assert "lost worker" not in text, describe(proc)  # a collective stop, not a lost peer
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_skip_on_two_workers_with_onebit_compression(tmp_path: Path) -> None:
    from test_faults import launch_cmd

    tiny = [a for a in TINY if not a.startswith("backend=")]
    out = tmp_path / "out"
    proc = run_python([*launch_cmd("torch"), *tiny, *RUN, "compression.name=onebit", "train.nonfinite=skip",
                       f"train.output_dir={out}"], cwd=tmp_path, timeout=240, DATKIT_TEST_NAN_AT_STEP="1:1:2")
    assert proc.returncode == 0, describe(proc)
    assert "at epoch 1 step 2 on rank(s) 1; step skipped" in proc.stderr, describe(proc)
    assert proc.stderr.count("step skipped") == 1, describe(proc)  # the residuals did not carry the NaN on
    ckpt = load_checkpoint(out)
    assert [r["nonfinite_skipped"] for r in ckpt["records"]] == [1, 0]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
