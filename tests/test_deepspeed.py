"""The deepspeed backend on CPU (2 processes under the ``deepspeed`` launcher, gloo).

- ZeRO-0, 1, 2 and 3 take exactly the steps of the torch backend (same seed, global batch, 2 workers):
  the weights agree to 1e-5 after 2 epochs of 3 Adam steps (all four stages in one launch);
- each worker's own socket writes during training match its ``bytes_per_iter`` within 10%, at every ZeRO
  stage and for the torch backend's DDP allreduce (``tests/helpers/wire.py``; the same launches);
- a run resumed from a ZeRO-2 checkpoint (its first epoch, run in that launch) ends with the uninterrupted
  ZeRO-2 run's weights; a ZeRO-0 checkpoint of 2 workers resumed by 1 worker ends with the 2-worker run's weights
  (ZeRO >= 1 refuses another worker count: ``test_checkpoint_untrusted.py``);
- compression works at stage 0 and is refused at stage >= 1 with a message that says why;
- without DeepSpeed installed, asking for it says how to install it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_certified_attacked import CROSS_BACKEND
from test_onebit_optim import ONEBIT

from helpers.collective_checks import read_results
from helpers.ports import reserve_port
from helpers.runs import REPO, TINY, assert_same_weights, describe, load_checkpoint, run_python
from helpers.wire import wire_records

pytest.importorskip("deepspeed", reason="needs DeepSpeed (pip install -e '.[deepspeed]'; the dev extra has it)")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(500)]

STEPS = ["train.epochs=1", "train.max_steps=3", "optim.name=sgd", "optim.lr=0.05", "schedule.name=constant"]
# ZeRO runs checked against the torch backend AND resumed from (the stage-2 run is the resume test's uninterrupted run).
# A 512-unit hidden layer: a 162 KB gradient, so the per-step costs that bytes_per_iter leaves out (gloo's message
# headers, the non-finite flags: ~1 KB) stay under 1% of the socket writes in the wire check.
ZERO = ["train.epochs=2", "train.max_steps=3", "optim.name=adam", "schedule.name=constant", "model.kwargs.hidden=512"]
STAGES = [0, 1, 2, 3]
WIRE = REPO / "tests" / "helpers" / "wire_train.py"


def _deepspeed(args: list[str], cwd: Path, timeout: float = 400, script: Path = REPO / "datkit" / "train.py",
               **env: str):
    port = reserve_port()
    train = script.name == "train.py"  # datkit.train takes --local_rank; a plain script gets --no_local_rank
    proc = run_python(["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
                       *([] if train else ["--no_local_rank"]), str(script), *(["backend=deepspeed"] if train else []),
                       *args], cwd=cwd,
                      timeout=timeout, **env)
    # DeepSpeed's CPU shm allreduce buffers (69 MB per worker) are named by port; datkit unlinks them at start-up
    left = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, f"DeepSpeed shared-memory buffers left in /dev/shm: {left}"
    return proc


def _tiny() -> list[str]:
    return [a for a in TINY if not a.startswith(("backend=", "model.kwargs.hidden="))]


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """(checkpoint, folder of the wire records) of the torch backend's run (torchrun, DDP's plain allreduce)."""
    tmp = tmp_path_factory.mktemp("torch")
    runs = {"torch": ["backend=torch", *_tiny(), *ZERO, f"train.output_dir={tmp / 'out'}"]}
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WIRE),
                       json.dumps(runs)], cwd=tmp, timeout=300, DATKIT_TEST_WIRE_DIR=str(tmp))
    assert proc.returncode == 0, describe(proc)
    return load_checkpoint(tmp / "out"), tmp


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Every DeepSpeed training run of this module but the resumed one, in ONE 2-worker launch (``wire_train.py``:
    one start-up of DeepSpeed for all): ZeRO-0/1/2/3 (``zero<stage>``), the first epochs of ZeRO-2 and ZeRO-0 alone
    (``zero2_part``, ``zero0_part``, resumed by the resume tests) and onebit at stage 0 with a semi-supervised
    teacher (``onebit``). Returns (folder with one output folder per run and the wire records, stdout)."""
    tmp = tmp_path_factory.mktemp("zero")
    runs = {f"zero{stage}": [*_tiny(), *ZERO, f"deepspeed.zero_stage={stage}"] for stage in (0, 1, 2)}
    runs["zero2_part"] = [*_tiny(), *ZERO, "deepspeed.zero_stage=2", "train.epochs=1"]
    runs["zero0_part"] = [*_tiny(), *ZERO, "deepspeed.zero_stage=0", "train.epochs=1"]
    # semi-supervised: the teacher trains through the same Trainer, on DeepSpeed with onebit compression too
    runs["onebit"] = [*_tiny(), "model.kwargs.hidden=32", *STEPS, "deepspeed.zero_stage=0", "compression.name=onebit",
                      "data.num_labeled=100", "semisup.enabled=true", "semisup.teacher_epochs=2"]
    # 1-bit Adam (test_onebit_optim.ONEBIT) at stage 0: the torch backend's steps; resumed after its first epoch
    runs["onebit_adam"] = [*_tiny(), *ONEBIT, "deepspeed.zero_stage=0"]
    runs["onebit_part"] = [*_tiny(), *ONEBIT, "deepspeed.zero_stage=0", "train.epochs=1"]
    runs["onebit_resumed"] = [*_tiny(), *ONEBIT, "deepspeed.zero_stage=0", "train.resume=true"]
    # MTL-IBP, SABR
    runs.update({name: [*_tiny(), *args, "deepspeed.zero_stage=0"] for name, args in CROSS_BACKEND.items()})
    runs["zero3"] = [*_tiny(), *ZERO, "deepspeed.zero_stage=3"]  # last: ZeRO-3 leaves hooks in DeepSpeed's globals
    runs = {name: ["backend=deepspeed", *args,
                   f"train.output_dir={tmp / ('onebit_part' if name == 'onebit_resumed' else name)}"]
            for name, args in runs.items()}
    proc = _deepspeed([json.dumps(runs)], tmp, timeout=480, script=WIRE, DATKIT_TEST_WIRE_DIR=str(tmp))
    assert proc.returncode == 0, describe(proc)
    return tmp, proc.stdout


def _stdout_of(zero_runs: tuple[Path, str], name: str) -> str:
    return zero_runs[1].split(f"=== run {name}\n", 1)[1].split("=== run ", 1)[0]


@pytest.mark.parametrize("stage", STAGES)
def test_zero_matches_the_torch_backend(stage: int, torch_run: tuple[dict, Path], zero_runs) -> None:
    out = zero_runs[0] / f"zero{stage}"
    stdout = _stdout_of(zero_runs, f"zero{stage}")
    assert f"backend=deepspeed world_size=2 device=cpu zero_stage={stage}" in stdout, stdout[-3000:]
    ds, ref = load_checkpoint(out), torch_run[0]
    assert ds["zero_stage"] == stage and (out / "checkpoint_last.pt.deepspeed").is_dir()
    assert_same_weights(ds["model"], ref["model"], atol=1e-5)
    for got, want in zip(ds["records"], ref["records"], strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5)
    assert ds["records"][0]["bytes_per_iter"] > 0 and ds["records"][0]["C_s"] > 0


def _assert_wire(folder: Path, run: str, steps: int = 3, epochs: int = 2) -> list[float]:
    recs = [r for r in wire_records(folder) if r["run"] == run]
    assert sorted((r["rank"], r["epoch"]) for r in recs) == [(k, e) for k in (0, 1) for e in range(1, epochs + 1)], recs
    ratios = [r["written"] / r["steps"] / r["bytes_per_iter"] for r in recs]
    assert all(r["steps"] == steps and r["bytes_per_iter"] > 0 for r in recs), recs
    assert all(0.9 <= x <= 1.1 for x in ratios), f"{run}: socket writes / bytes_per_iter per rank and epoch: {ratios}"
    return ratios


@pytest.mark.parametrize("stage", STAGES)
def test_zero_bytes_per_iter_match_the_socket_writes(stage: int, zero_runs) -> None:
    """Each worker's own socket writes during an epoch's training = its bytes_per_iter x steps, within 10%."""
    _assert_wire(zero_runs[0], f"zero{stage}")


def test_ddp_bytes_per_iter_match_the_socket_writes(torch_run: tuple[dict, Path]) -> None:
    """The torch backend's DDP allreduce (no compression), in the same launch as the reference weights."""
    _assert_wire(torch_run[1], "torch")


def test_resume_from_a_zero2_checkpoint_is_exact(zero_runs, tmp_path: Path) -> None:
    full = zero_runs[0] / "zero2"  # the uninterrupted run (2 epochs); zero2_part: its first epoch, in the same launch
    part = tmp_path / "part"
    shutil.copytree(zero_runs[0] / "zero2_part", part)
    assert [r["epoch"] for r in load_checkpoint(part)["records"]] == [1]
    proc = _deepspeed([*_tiny(), *ZERO, "deepspeed.zero_stage=2", "train.resume=true", f"train.output_dir={part}"],
                      tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "resumed from" in proc.stdout, describe(proc)
    assert_same_weights(load_checkpoint(full)["model"], load_checkpoint(part)["model"], atol=0.0)
    assert sorted(p.name for p in (part / "checkpoint_last.pt.deepspeed").iterdir() if p.is_dir()) == ["epoch2"]


def test_a_zero0_checkpoint_of_2_workers_resumes_on_1_worker(zero_runs, tmp_path: Path) -> None:
    """ZeRO-0 keeps the whole optimizer state in one file and every per-sample draw is keyed by the sample's global
    position (``datkit/randomness.py``): 1 worker continues the 2-worker run (default random start on)."""
    full = zero_runs[0] / "zero0"
    part = tmp_path / "part"
    shutil.copytree(zero_runs[0] / "zero0_part", part)
    assert load_checkpoint(part)["world_size"] == 2
    proc = run_python(["-m", "datkit.train", "backend=deepspeed", *_tiny(), *ZERO, "deepspeed.zero_stage=0",
                       "train.resume=true", f"train.output_dir={part}"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, describe(proc)
    assert "world_size=1" in proc.stdout and "resumed from" in proc.stdout, describe(proc)
    assert_same_weights(load_checkpoint(full)["model"], load_checkpoint(part)["model"], atol=1e-5)


def test_onebit_compression_at_stage_0_teacher_included(zero_runs) -> None:
    out = zero_runs[0] / "onebit"
    rec = load_checkpoint(out)["records"][0]
    assert 0 < rec["bytes_per_iter"] < 2000, rec  # ~1/32 of the float32 gradient (18,440 bytes) plus scales
    teacher = json.loads((out / "teacher" / "results.json").read_text())
    assert teacher["final"]["backend"] == "deepspeed" and len(teacher["epochs"]) == 2 and (out / "teacher.pt").is_file()
    assert all(0 < r["bytes_per_iter"] < 2000 for r in teacher["epochs"]), teacher["epochs"]


def test_onebit_adam_at_stage_0_takes_the_torch_backends_steps_and_resumes_exactly(zero_runs,
                                                                                   torch_onebit: Path) -> None:
    """1-bit Adam as DeepSpeed's client optimizer (the engine's allreduce off, the optimizer's exchange over
    deepspeed.comm): the torch backend's weights (1e-5) and bytes; resumed after epoch 1, the uninterrupted end."""
    ds, ref = load_checkpoint(zero_runs[0] / "onebit_adam"), load_checkpoint(torch_onebit / "ddp")
    assert_same_weights(ds["model"], ref["model"], atol=1e-5)
    for rec, want in zip(ds["records"], ref["records"]):
        assert rec["bytes_per_iter"] == pytest.approx(want["bytes_per_iter"], rel=1e-9)
    assert_same_weights(load_checkpoint(zero_runs[0] / "onebit_part")["model"], ds["model"], atol=0.0)


@pytest.mark.parametrize("name", list(CROSS_BACKEND))
def test_certified_training_with_a_pgd_point_matches_the_torch_backend(name: str, zero_runs,
                                                                        torch_onebit: Path) -> None:
    """MTL-IBP and SABR at ZeRO-0: the torch backend's weights (the bound rules read the modules' weights)."""
    ds, ref = load_checkpoint(zero_runs[0] / name), load_checkpoint(torch_onebit / name)
    assert ds["world_size"] == 2 and ref["world_size"] == 2
    assert_same_weights(ds["model"], ref["model"], atol=1e-5)
    assert ds["records"][0]["VA"] == ref["records"][0]["VA"]


def test_collectives(tmp_path: Path) -> None:
    """``tests/helpers/collective_checks.py`` (shared with the torch and Horovod tests) on 2 DeepSpeed workers."""
    proc = _deepspeed([str(tmp_path)], tmp_path, script=REPO / "tests" / "helpers" / "collective_checks.py",
                      DATKIT_TEST_BACKEND="deepspeed")
    assert proc.returncode == 0, describe(proc)
    results = read_results(tmp_path, 2)
    assert results == {0: "ok", 1: "ok"}, f"collectives failed: {results}"


def test_compression_with_zero_stage_1_fails_at_start_up(tmp_path: Path) -> None:
    proc = run_python(["-m", "datkit.train", "backend=deepspeed", "deepspeed.zero_stage=1", "compression.name=int8",
                       f"train.output_dir={tmp_path / 'x'}"], cwd=tmp_path, timeout=200)
    assert proc.returncode == 2, describe(proc)
    assert "zero_stage=0" in proc.stderr and "reduce-scatter" in proc.stderr, describe(proc)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_bound_methods_with_zero_stage_3_fail_at_start_up(method: str, tmp_path: Path) -> None:
    # the bound rules read module.weight directly; ZeRO-3 leaves a 0-element partition there outside forward()
    proc = run_python(["-m", "datkit.train", "backend=deepspeed", "deepspeed.zero_stage=3", f"method.name={method}",
                       f"train.output_dir={tmp_path / 'x'}"], cwd=tmp_path, timeout=200)
    assert proc.returncode == 2, describe(proc)
    assert f"method.name={method}" in proc.stderr and "zero_stage=0, 1 or 2" in proc.stderr, describe(proc)
    assert not (tmp_path / "x").exists()


def test_missing_deepspeed_says_how_to_install(tmp_path: Path) -> None:
    script = ("import sys; sys.modules['deepspeed'] = None\n"
              "from datkit.train import main\nmain(['backend=deepspeed'])\n")
    proc = run_python(["-c", script], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, describe(proc)
    assert ("pip install" in proc.stderr and "deepspeed" in proc.stderr
            and "backend=torch" in proc.stderr), describe(proc)


def test_bad_deepspeed_values_fail_at_start_up(tmp_path: Path) -> None:
    proc = run_python(["-m", "datkit.train", "backend=deepspeed", "deepspeed.zero_stage=4",
                       "deepspeed.offload_param=cpu"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, describe(proc)
    assert "deepspeed.zero_stage=4 is not one of: 0, 1, 2, 3" in proc.stderr, describe(proc)
    assert "offload_param=cpu needs deepspeed.zero_stage=3" in proc.stderr, describe(proc)


def test_bench_zero_halves_optimizer_state_at_stage_1_and_2(tmp_path: Path) -> None:
    out = tmp_path / "zero.json"
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "datkit.bench",
                       "zero", "--model", "cnn_small", "--data", "mnist5k", "--image-size", "28", "--json", str(out)],
                      cwd=tmp_path, timeout=400)
    assert proc.returncode == 0, describe(proc)
    import json

    rows = {r["stage"]: r for r in json.loads(out.read_text())}
    # Adam: exp_avg + exp_avg_sq in float32 (plus a scalar step counter per tensor)
    assert rows[0]["optimizer_state_bytes"] == pytest.approx(2 * 4 * rows[0]["params"], rel=1e-4)
    for stage in (1, 2):
        assert rows[stage]["ratio_vs_stage0"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_example_deepspeed_json_merges_over_datkits_config(path: Path) -> None:
    import json

    from datkit.backends.deepspeed_config import build_ds_config
    from datkit.config import load_config

    cfg = load_config(None, [f"deepspeed.config_file={path}", "train.batch_size=64", "train.grad_accum=2"])
    ds = build_ds_config(cfg, world_size=2, on_gpu=False)
    user = json.loads(path.read_text())
    assert ds["zero_optimization"]["stage"] == user["zero_optimization"]["stage"]
    assert ((ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
            == (64, 16, 2))
    assert ds["zero_allow_untested_optimizer"] is True


def test_config_file_batch_sizes_must_agree(tmp_path: Path) -> None:
    from datkit.backends.deepspeed_config import build_ds_config
    from datkit.config import ConfigError, load_config

    f = tmp_path / "ds.json"
    f.write_text('{"train_batch_size": 999}')
    with pytest.raises(ConfigError, match="train_batch_size=999"):
        build_ds_config(load_config(None, [f"deepspeed.config_file={f}"]), world_size=2, on_gpu=False)
