"""The deepspeed backend on CPU (2 processes under the ``deepspeed`` launcher, gloo).

- ZeRO-0 and ZeRO-2 take exactly the steps of the torch backend (same seed, global batch, 2 workers):
  the weights agree to 1e-5 after 2 epochs of 3 Adam steps;
- a run resumed from a ZeRO-2 checkpoint ends with the uninterrupted run's weights (that same ZeRO-2 run:
  one launch checked both ways);
- compression works at stage 0 and is refused at stage >= 1 with a message that says why;
- without DeepSpeed installed, asking for it says how to install it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.collective_checks import read_results
from helpers.ports import reserve_port
from helpers.runs import REPO, TINY, assert_same_weights, describe, load_checkpoint, run_python

pytest.importorskip("deepspeed", reason="needs DeepSpeed (pip install -e '.[deepspeed]'; the dev extra has it)")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(500)]

STEPS = ["train.epochs=1", "train.max_steps=3", "optim.name=sgd", "optim.lr=0.05", "schedule.name=constant"]
# ZeRO runs checked against the torch backend AND resumed from (the stage-2 run is the resume test's uninterrupted run)
ZERO = ["train.epochs=2", "train.max_steps=3", "optim.name=adam", "schedule.name=constant"]


def _deepspeed(args: list[str], cwd: Path, timeout: float = 400, script: Path = REPO / "datkit" / "train.py", **env: str):
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


def _torchrun(args: list[str], cwd: Path):
    return run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "datkit.train",
                       "backend=torch", *args], cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("torch")
    proc = _torchrun([*_tiny(), *ZERO, f"train.output_dir={tmp / 'out'}"], tmp)
    assert proc.returncode == 0, describe(proc)
    return load_checkpoint(tmp / "out")


def _tiny() -> list[str]:
    return [a for a in TINY if not a.startswith("backend=")]


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory: pytest.TempPathFactory):
    """``zero_run(stage)`` -> (output folder, stdout) of the 2-worker ZeRO run (launched once per stage)."""
    cache: dict[int, tuple[Path, str]] = {}

    def get(stage: int) -> tuple[Path, str]:
        if stage not in cache:
            tmp = tmp_path_factory.mktemp(f"zero{stage}")
            out = tmp / "ds"
            proc = _deepspeed([*_tiny(), *ZERO, f"deepspeed.zero_stage={stage}", f"train.output_dir={out}"], tmp)
            assert proc.returncode == 0, describe(proc)
            cache[stage] = (out, proc.stdout)
        return cache[stage]

    return get


@pytest.mark.parametrize("stage", [0, 2])
def test_zero_matches_the_torch_backend(stage: int, torch_run: dict, zero_run) -> None:
    out, stdout = zero_run(stage)
    assert f"backend=deepspeed world_size=2 device=cpu zero_stage={stage}" in stdout, stdout[-3000:]
    ds = load_checkpoint(out)
    assert ds["zero_stage"] == stage and (out / "checkpoint_last.pt.deepspeed").is_dir()
    assert_same_weights(ds["model"], torch_run["model"], atol=1e-5)
    for got, ref in zip(ds["records"], torch_run["records"], strict=True):
        assert got["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-5)
    assert ds["records"][0]["bytes_per_iter"] > 0 and ds["records"][0]["C_s"] > 0


def test_resume_from_a_zero2_checkpoint_is_exact(zero_run, tmp_path: Path) -> None:
    full, _ = zero_run(2)  # the uninterrupted run (2 epochs)
    args = [*_tiny(), *ZERO[1:], "deepspeed.zero_stage=2"]
    part = tmp_path / "part"
    proc = _deepspeed([*args, "train.epochs=1", f"train.output_dir={part}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    proc = _deepspeed([*args, "train.epochs=2", "train.resume=true", f"train.output_dir={part}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "resumed from" in proc.stdout, describe(proc)
    assert_same_weights(load_checkpoint(full)["model"], load_checkpoint(part)["model"], atol=0.0)
    assert sorted(p.name for p in (part / "checkpoint_last.pt.deepspeed").iterdir() if p.is_dir()) == ["epoch2"]


def test_onebit_compression_at_stage_0_teacher_included(tmp_path: Path) -> None:
    # semi-supervised: the teacher trains through the same Trainer, on DeepSpeed with onebit compression too
    out = tmp_path / "ob"
    proc = _deepspeed([*_tiny(), *STEPS, "deepspeed.zero_stage=0", "compression.name=onebit", "data.num_labeled=100",
                       "semisup.enabled=true", "semisup.teacher_epochs=2", f"train.output_dir={out}"], tmp_path)
    assert proc.returncode == 0, describe(proc)
    rec = load_checkpoint(out)["records"][0]
    assert 0 < rec["bytes_per_iter"] < 2000, rec  # ~1/32 of the float32 gradient (18,440 bytes) plus scales
    teacher = json.loads((out / "teacher" / "results.json").read_text())
    assert teacher["final"]["backend"] == "deepspeed" and len(teacher["epochs"]) == 2 and (out / "teacher.pt").is_file()
    assert all(0 < r["bytes_per_iter"] < 2000 for r in teacher["epochs"]), teacher["epochs"]


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
    assert "pip install" in proc.stderr and "deepspeed" in proc.stderr and "backend=torch" in proc.stderr, describe(proc)


def test_bad_deepspeed_values_fail_at_start_up(tmp_path: Path) -> None:
    proc = run_python(["-m", "datkit.train", "backend=deepspeed", "deepspeed.zero_stage=4", "deepspeed.offload_param=cpu"],
                      cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, describe(proc)
    assert "deepspeed.zero_stage=4 is not one of: 0, 1, 2, 3" in proc.stderr, describe(proc)
    assert "offload_param=cpu needs deepspeed.zero_stage=3" in proc.stderr, describe(proc)


def test_bench_zero_halves_optimizer_state_at_stage_1_and_2(tmp_path: Path) -> None:
    out = tmp_path / "zero.json"
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "datkit.bench", "zero",
                       "--model", "cnn_small", "--data", "mnist5k", "--image-size", "28", "--json", str(out)],
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
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 16, 2)
    assert ds["zero_allow_untested_optimizer"] is True


def test_config_file_batch_sizes_must_agree(tmp_path: Path) -> None:
    from datkit.backends.deepspeed_config import build_ds_config
    from datkit.config import ConfigError, load_config

    f = tmp_path / "ds.json"
    f.write_text('{"train_batch_size": 999}')
    with pytest.raises(ConfigError, match="train_batch_size=999"):
        build_ds_config(load_config(None, [f"deepspeed.config_file={f}"]), world_size=2, on_gpu=False)
