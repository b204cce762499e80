"""Multi-process training on CPU (gloo, 2 processes under torchrun).

- 2 workers with global batch G take the same steps as 1 worker with global batch G (the sampler
  splits the global batch, DDP averages the gradients), so the weights agree after a few steps;
- gradient accumulation: 2 micro-batches of G/2 give the same update as one batch of G, and as 2 workers;
- all of it with the default recipe (PGD random start on, Adam) and random shifts: the per-sample noise is
  keyed by the sample's global position, never by the rank (``datkit.randomness``);
- the collectives of ``TorchBackend`` do what the Backend interface says on 2 processes.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers.collective_checks import read_results
from helpers.runs import REPO, TINY, assert_same_weights, describe, load_checkpoint, run_python, train_inprocess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# The default recipe: PGD with random start, Adam, plus random shifts. Every per-sample draw is keyed by the
# sample's global position (datkit.randomness), so it does not depend on how the batch is split. A constant
# learning rate, so that a 1-epoch run is the first epoch of a 2-epoch run (the resume test).
STEPS = ["train.epochs=1", "train.max_steps=3", "train.batch_size=32", "data.augment_shift=1", "schedule.name=constant"]


def _torchrun(nproc: int, args: list[str], cwd: Path, timeout: float = 280):
    return run_python(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args], cwd=cwd,
                      timeout=timeout)


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Checkpoint of the tiny run as one plain ``python -m datkit.train`` process."""
    tmp = tmp_path_factory.mktemp("one_worker")
    proc = run_python(["-m", "datkit.train", *TINY, *STEPS, f"train.output_dir={tmp / 'out'}"], cwd=tmp, timeout=280)
    assert proc.returncode == 0, describe(proc)
    assert "world_size=1" in proc.stdout, describe(proc)
    return {**load_checkpoint(tmp / "out"), "dir": tmp / "out"}


@pytest.fixture(scope="module")
def one_worker_accumulating(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same run in this process with 2 micro-batches of 16 (``train.grad_accum=2``)."""
    out = tmp_path_factory.mktemp("accum2") / "out"
    train_inprocess([*STEPS, "train.grad_accum=2", f"train.output_dir={out}"])
    return load_checkpoint(out)


@pytest.mark.parametrize("ddp", ["true", "false"], ids=["ddp", "manual_allreduce"])
def test_two_workers_match_one_worker_with_the_same_global_batch(ddp: str, one_worker: dict,
                                                                 one_worker_accumulating: dict, tmp_path: Path) -> None:
    out2 = tmp_path / "two"
    proc = _torchrun(2, ["-m", "datkit.train", *TINY, *STEPS, f"dist.ddp={ddp}", f"train.output_dir={out2}"],
                     cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "world_size=2" in proc.stdout, describe(proc)

    two, one = load_checkpoint(out2), one_worker
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["epoch"] == one["epoch"] == 1
    assert_same_weights(two["model"], one["model"], atol=1e-5)
    # 2 workers x 16 == 1 worker x 2 micro-batches of 16 (a micro-batch draws what it would in the whole batch)
    assert_same_weights(two["model"], one_worker_accumulating["model"], atol=1e-5)
    # and training did move the weights (the comparison is not between two initial models)
    init = _initial_weights(tmp_path)
    moved = max((one["model"][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3, "the weights did not change in 3 steps"
    # the loss reported is the mean over all workers' steps, so it agrees too
    assert two["records"][0]["train_loss"] == pytest.approx(one["records"][0]["train_loss"], abs=1e-5)
    # evaluation is split across workers and summed: both runs evaluate the same 50 examples
    assert two["records"][0]["n_eval"] == one["records"][0]["n_eval"] == 50
    # and PGD's random start in evaluation is keyed by test index: RA does not depend on the worker count
    assert (two["records"][0]["TA"], two["records"][0]["RA"]) == (one["records"][0]["TA"], one["records"][0]["RA"])


def test_resume_on_two_workers_continues_a_one_worker_run(one_worker: dict, tmp_path: Path) -> None:
    """Epoch 1 on 1 worker x 32, epoch 2 resumed on 2 workers x 16 == both epochs on 1 worker x 32: the model and
    optimizer state are replicated on the torch backend, and the per-sample noise is keyed by position, not rank."""
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(one_worker["dir"], resumed)
    epoch2 = [*STEPS, "train.epochs=2", "train.resume=true"]
    proc = _torchrun(2, ["-m", "datkit.train", *TINY, *epoch2, f"train.output_dir={resumed}"], cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    assert "resumed from" in proc.stdout and "world_size=2" in proc.stdout, describe(proc)
    full = tmp_path / "full"
    train_inprocess([*STEPS, "train.epochs=2", f"train.output_dir={full}"])
    two, one = load_checkpoint(resumed), load_checkpoint(full)
    assert two["epoch"] == one["epoch"] == 2 and two["world_size"] == 2
    assert_same_weights(two["model"], one["model"], atol=1e-5)
    assert two["records"][1]["train_loss"] == pytest.approx(one["records"][1]["train_loss"], abs=1e-5)


def _initial_weights(tmp_path: Path) -> dict:
    """The model the tiny config starts from (same seed, built the way the trainer builds it)."""
    import torch

    from datkit.config import load_config
    from datkit.data import DATASETS
    from datkit.engine import build_model

    cfg = load_config(None, [*TINY, *STEPS, f"train.output_dir={tmp_path / 'init'}"])
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg, DATASETS.get(cfg.data.name)).state_dict()


def test_gradient_accumulation_matches_one_batch(one_worker: dict, one_worker_accumulating: dict) -> None:
    a, b = one_worker, one_worker_accumulating
    assert_same_weights(a["model"], b["model"], atol=1e-5)
    assert a["records"][0]["train_loss"] == pytest.approx(b["records"][0]["train_loss"], abs=1e-5)


@pytest.mark.parametrize("nproc", [2, 3])
def test_torch_backend_collectives(nproc: int, tmp_path: Path) -> None:
    """``tests/helpers/collective_checks.py`` (shared with the Horovod and DeepSpeed tests) on 2 and 3 workers:
    on gloo the compressed exchange's all_to_all / all_gather are receive-first p2p (``backends/p2p_exchange.py``)."""
    proc = run_python(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                       str(REPO / "tests" / "helpers" / "collective_checks.py"), str(tmp_path)], cwd=tmp_path,
                      timeout=240, DATKIT_TEST_BACKEND="torch", DATKIT_TEST_WORLD=str(nproc))
    assert proc.returncode == 0, describe(proc)
    results = read_results(tmp_path, nproc)
    assert results == dict.fromkeys(range(nproc), "ok"), f"collectives failed: {results}"


def test_torch_backend_single_process_collectives_are_noops() -> None:
    import torch

    from datkit.backends.spec import BackendSpec
    from datkit.backends.torch_dist import TorchBackend

    be = TorchBackend(BackendSpec(device="cpu"))
    assert (be.rank, be.world_size, be.is_main) == (0, 1, True)
    t = torch.tensor([1.0, 2.0])
    assert be.all_reduce(t, op="sum") is t and be.all_reduce(t, op="mean").tolist() == [1.0, 2.0]
    assert be.all_gather(t).shape == (1, 2)
    assert torch.equal(be.all_to_all(t), t) and torch.equal(be.broadcast(t), t)
    be.barrier()
    be.close()

