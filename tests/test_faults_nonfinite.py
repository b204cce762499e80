"""``train.nonfinite``: a NaN/Inf loss or gradient is found on every worker at the same step.

- one worker (in-process): ``stop`` exits with code 4 naming epoch/step/rank (a NaN in a gradient only); ``skip``
  drops the step, counts it in results.json and keeps the weights finite; ``max_nonfinite_skips`` consecutive skips
  stop; bad values of the keys fail at start-up;
- two workers, one launch per gradient path (torchrun: DDP's float32 hook, ``dist.ddp=false`` with int8
  compression in the step, onebit compression in DDP's hook; horovodrun: hvd.DistributedOptimizer; deepspeed:
  ZeRO-0): a NaN in one worker's gradient only (finite loss) and a NaN loss are skipped on every worker, the rank
  named -- so the NaN was seen before compression, where the decoded average would be finite garbage, and before
  the mean that hides whose it was --, the error-feedback residuals do not carry it on, and after
  ``max_nonfinite_skips`` consecutive skips every worker stops at the same step with exit code 4.

NaNs are injected with the test-only hooks ``DATKIT_TEST_NAN_AT_STEP=rank:epoch:step`` (the loss of that
rank at that step is multiplied by NaN, so its gradients are NaN too) and ``DATKIT_TEST_GRAD_NAN_AT_STEP``
(one element of that rank's local gradient, before any reduction; the loss stays finite).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from datkit.config import ConfigError, load_config
from datkit.preflight import validate_config
from helpers.runs import TINY, describe, load_checkpoint, run_python, train_inprocess

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
    monkeypatch.setenv("DATKIT_TEST_GRAD_NAN_AT_STEP", "0:2:1")  # a NaN in a gradient only: the loss is finite
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


# --- two workers: one launch per gradient path --------------------------------------------------------------
# Every launch runs with train.nonfinite=skip and train.max_nonfinite_skips=2, and poisons
#   epoch 1 step 1: rank 1's *gradient* only (its loss stays finite)  -> skipped on every worker;
#   epoch 2 step 0: rank 0's loss                                      -> skipped;
#   epoch 2 step 1: rank 1's gradient only                             -> the 2nd skip in a row: every worker stops
#                                                                         at that step, exit code 4.
# Rank 1 is named at epoch 1 step 1 only if its local gradient was flagged before the reduction or compression
# hid whose it was (onebit's/int8's block scale and a mean spread it to every rank; removing the pre-compression
# flag of DDP's compressed hook makes the onebit launch say "in the averaged gradients" instead).
PATHS = {  # name -> (launcher, overrides)
    "ddp": ("torch", []),  # DDP with datkit's float32 allreduce comm hook
    # no DDP: the manual bucketed path, int8-compressed, in step (after the check: .grad is still local)
    "plain_int8": ("torch", ["dist.ddp=false", "compression.name=int8"]),
    "onebit": ("torch", ["compression.name=onebit"]),  # DDP comm hook compressing each bucket during backward
    "horovod": ("horovod", []),  # hvd.DistributedOptimizer's hooks, during backward
    "deepspeed": ("deepspeed", []),  # the ZeRO-0 engine's allreduce after backward
}
GRAD_NAN, LOSS_NAN = "1:1:1,1:2:1", "0:2:0"
STOPPED = (r"datkit: non-finite loss/gradient at epoch 2 step 1 on rank\(s\) 1; stopping after 2 consecutive skipped "
           r"steps \(train.max_nonfinite_skips=2\) \[rank {}\]")


@pytest.fixture(scope="module")
def launches(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """name -> (finished launcher process, output folder, {rank: exit code}); two launches at a time, only the
    paths whose tests were selected (``-k onebit`` launches one)."""
    from concurrent.futures import ThreadPoolExecutor

    from test_faults import LAUNCHERS, exit_codes, launch_cmd, remove_deepspeed_shm

    tiny = [a for a in TINY if not a.startswith("backend=")]

    def launch(name: str):
        backend, overrides = PATHS[name]
        tmp = tmps[name]
        (tmp / "codes").mkdir()
        cmd = launch_cmd(backend, record_exit=True)
        try:
            proc = run_python([*cmd, *tiny, *RUN, *overrides, "train.nonfinite=skip", "train.max_nonfinite_skips=2",
                               f"train.output_dir={tmp / 'out'}"], cwd=tmp, timeout=300,
                              DATKIT_TEST_GRAD_NAN_AT_STEP=GRAD_NAN, DATKIT_TEST_NAN_AT_STEP=LOSS_NAN,
                              DATKIT_TEST_EXIT_LOG=str(tmp / "codes"))
        finally:
            remove_deepspeed_shm(cmd)
        return proc, tmp / "out", exit_codes(tmp / "codes")

    selected = {getattr(getattr(item, "callspec", None), "params", {}).get("path") for item in request.session.items
                if getattr(item, "module", None) is request.module}
    names = [n for n in PATHS if n in selected and LAUNCHERS[PATHS[n][0]][1] is None]
    tmps = {n: tmp_path_factory.mktemp(n) for n in names}  # not in the threads: mktemp is not thread-safe
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(names, pool.map(launch, names)))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", list(PATHS))
def test_a_nan_gradient_is_caught_at_the_same_step_on_every_worker(path: str, launches: dict) -> None:
    if path not in launches:
        pytest.skip(f"needs {PATHS[path][0]}")
    proc, out, codes = launches[path]
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and codes == {0: 4, 1: 4}, describe(proc)  # every worker's own exit code: 4
    assert "at epoch 1 step 1 on rank(s) 1; step skipped (train.nonfinite=skip, 1 in a row, 1 this epoch)" in text, \
        describe(proc)
    assert "at epoch 2 step 0 on rank(s) 0; step skipped (train.nonfinite=skip, 1 in a row, 1 this epoch)" in text, \
        describe(proc)
    assert text.count("step skipped") == 2, describe(proc)  # no residual carried the NaN into a later step
    for rank in (0, 1):  # both workers stop at the same step, naming rank 1
        assert re.search(STOPPED.format(rank), text), describe(proc)
    assert "lost worker" not in text, describe(proc)  # a collective stop, not a lost peer
    assert not re.search(r'File ".*(datkit|helpers)/', text), describe(proc)  # no traceback from a worker
    ckpt = load_checkpoint(out)  # epoch 1 (one step skipped) was saved with finite weights; epoch 2 was not
    assert ckpt["epoch"] == 1 and [r["nonfinite_skipped"] for r in ckpt["records"]] == [1], describe(proc)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (out / "results.json").exists()
