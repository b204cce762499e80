"""The horovod backend on CPU (2 processes under ``horovodrun -np 2 -H localhost:2 --gloo``).

- it takes exactly the steps of the torch backend (same seed, global batch, 2 workers each, no
  compression): the weights agree to 1e-5 after a few steps, also with 2 accumulated micro-batches and
  gradient clipping (Horovod's ``backward_passes_per_step``, clipping after ``synchronize``), and the
  measured bytes per step equal the torch backend's, and match each worker's own socket writes within 10%;
  the same under Open MPI's ``mpirun -np 2`` (Horovod's MPI controller and MPI allreduce), when Horovod was
  built with MPI (``launchers/install_horovod.sh`` does when ``mpicxx`` is on PATH);
- every collective of the Backend interface, and every compressor (the checks of
  ``tests/test_compress_dist.py``, on Horovod's collectives); training with fp16 / int8 / onebit;
- bad input: no Horovod installed, or no horovodrun, fails at start-up with what to do.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_certified_attacked import CROSS_BACKEND

# The same assertions as for the torch backend, collected here on this module's ``checks`` fixture.
from test_compress_dist import (  # noqa: F401
    test_bytes_per_iteration_relative_to_fp32_allreduce,
    test_error_feedback_keeps_the_running_sum_on_track,
    test_error_stays_under_the_analytic_bound,
    test_none_is_the_exact_mean_bit_for_bit,
    test_residuals_gather_to_rank_0_and_come_back,
    test_stochastic_int8_is_unbiased,
    test_two_sided_is_one_sided_plus_the_server_quantization,
)
from test_onebit_optim import ONEBIT

from helpers.collective_checks import read_results
from helpers.runs import (
    NO_HOROVOD,
    REPO,
    TINY,
    assert_same_weights,
    child_env,
    describe,
    installed,
    load_checkpoint,
    no_horovod_mpi,
    run_python,
)

HAVE_HOROVOD = installed("horovod.torch")
NO_HOROVOD_MPI = no_horovod_mpi()
needs_horovod = pytest.mark.skipif(not HAVE_HOROVOD, reason=NO_HOROVOD)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

STEPS = ["train.epochs=1", "train.max_steps=3", "optim.name=sgd", "optim.lr=0.05", "schedule.name=constant"]


def _tiny() -> list[str]:
    return [a for a in TINY if not a.startswith("backend=")]


def _pythonpath(*first: Path) -> str:
    """``first``, then this process's PYTHONPATH (a checkout whose datkit is not the installed one stays first)."""
    return os.pathsep.join([*map(str, first), *filter(None, [os.environ.get("PYTHONPATH")])])


def _horovodrun(args: list[str], cwd: Path, timeout: float = 360, **env: str):
    env.setdefault("PYTHONPATH", _pythonpath(REPO / "tests"))
    return run_python(["-m", "horovod.runner.launch", "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, *args],
                      cwd=cwd, timeout=timeout, **env)


def _mpirun(args: list[str], cwd: Path, timeout: float = 360, **env: str) -> subprocess.CompletedProcess:
    """``mpirun -np 2 python args`` (Open MPI; as root it needs --allow-run-as-root): Horovod's MPI controller.
    ``env`` and the child environment's PYTHONPATH and thread counts go to the workers (``-x``)."""
    env.setdefault("PYTHONPATH", _pythonpath(REPO / "tests"))
    forward = [a for k in sorted({*env, "OMP_NUM_THREADS", "MKL_NUM_THREADS"}) for a in ("-x", k)]
    cmd = ["mpirun", "--allow-run-as-root", "-np", "2", "--bind-to", "none", *forward, sys.executable, *args]
    return subprocess.run(cmd, cwd=str(cwd), env=child_env(**env), capture_output=True, text=True, timeout=timeout)


# --- training: every Horovod run of this module in ONE horovodrun launch ---------------------------
# Starting 2 workers costs ~10 s here, so the CLI entry point ``datkit.train.main`` is called once per
# run inside one launch. Horovod stays initialised between the runs (``hvd.init`` of the next run's
# backend is then a no-op): in one static horovodrun job, hvd.shutdown followed by hvd.init fails now
# and then (gloo finds the previous context's addresses at the rendezvous: "Connect timeout").
RUNS: dict[str, list[str]] = {
    "none": ["train.grad_clip=0.05"],
    "none_accum2": ["train.grad_clip=0.05", "train.grad_accum=2"],
    "fp16": ["compression.name=fp16"],
    "int8_two_sided": ["compression.name=int8", "compression.two_sided=true"],
    "onebit": ["compression.name=onebit"],
    # the semi-supervised teacher trains through the same Trainer: Horovod's hooks, int8 compression and all
    "semisup_int8": ["compression.name=int8", "data.num_labeled=100", "semisup.enabled=true",
                     "semisup.teacher_epochs=2"],
    # the wire check: an 8192-unit hidden layer (a 2 MB gradient per step) next to Horovod's negotiation, which
    # bytes_per_iter leaves out (7-16 KB per step here, more on a slower machine: one round per 1 ms cycle)
    "wide": ["model.kwargs.hidden=8192"],
    # 1-bit Adam (test_onebit_optim.ONEBIT): the torch backend's steps; resumed after its first epoch, the same end
    "onebit_adam": ONEBIT,
    "onebit_part": [*ONEBIT, "train.epochs=1"],
    "onebit_resumed": [*ONEBIT, "train.resume=true", "train.output_dir=onebit_part"],
    **CROSS_BACKEND,  # MTL-IBP and SABR: the torch backend's weights (torch_onebit's launch)
}
_RUNNER = """
import json, os, sys
import horovod.torch as hvd
from datkit.backends.horovod_backend import HorovodBackend
from datkit.train import main
from helpers import wire
wire.install()  # every epoch's socket writes next to its bytes_per_iter (DATKIT_TEST_WIRE_DIR)
HorovodBackend.close = lambda self: self.barrier()  # keep Horovod up for the next run
for name, args in json.loads(sys.argv[1]).items():
    if os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK")) == "0":  # horovodrun --gloo, mpirun
        print(f"=== run {name}", flush=True)
    os.environ["DATKIT_TEST_WIRE_RUN"] = name
    own = [] if any(a.startswith("train.output_dir=") for a in args) else [f"train.output_dir={name}"]
    main(["backend=horovod", *args, *own])
hvd.shutdown()
"""


@pytest.fixture(scope="module")
def hvd_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(folder holding one output folder per run of ``RUNS``, the launch's stdout)."""
    if not HAVE_HOROVOD:
        pytest.skip(NO_HOROVOD)
    tmp = tmp_path_factory.mktemp("hvd_runs")
    runs = {name: [*_tiny(), *STEPS, *extra] for name, extra in RUNS.items()}
    proc = _horovodrun(["-c", _RUNNER, json.dumps(runs)], tmp, DATKIT_TEST_WIRE_DIR=str(tmp))
    assert proc.returncode == 0, describe(proc)
    return tmp, proc.stdout


def _stdout_of(hvd_runs: tuple[Path, str], name: str) -> str:
    return hvd_runs[1].split(f"=== run {name}\n", 1)[1].split("=== run ", 1)[0]


EQUALITY = {"one_batch": "none", "two_micro_batches": "none_accum2"}  # the runs compared with the torch backend


@pytest.fixture(scope="module")
def mpi_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The equality runs of ``RUNS`` under ``mpirun -np 2`` (one launch): Horovod's MPI controller and allreduce."""
    if NO_HOROVOD_MPI:
        pytest.skip(NO_HOROVOD_MPI)
    tmp = tmp_path_factory.mktemp("hvd_mpi_runs")
    runs = {name: [*_tiny(), *STEPS, *RUNS[name]] for name in EQUALITY.values()}
    proc = _mpirun(["-c", _RUNNER, json.dumps(runs)], tmp, DATKIT_TEST_WIRE_DIR=str(tmp))
    assert proc.returncode == 0, describe(proc)
    return tmp, proc.stdout


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The torch backend's checkpoint after the same 3 steps (torchrun, 2 workers, grad_clip 0.05)."""
    tmp = tmp_path_factory.mktemp("torch")
    proc = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "datkit.train",
                       "backend=torch", *_tiny(), *STEPS, "train.grad_clip=0.05", f"train.output_dir={tmp / 'out'}"],
                      cwd=tmp, timeout=300)
    assert proc.returncode == 0, describe(proc)
    return load_checkpoint(tmp / "out")


@needs_horovod
@pytest.mark.parametrize("controller", ["gloo", "mpi"])  # horovodrun --gloo (hvd_runs), mpirun (mpi_runs)
@pytest.mark.parametrize("name", list(EQUALITY.values()), ids=list(EQUALITY))
def test_matches_the_torch_backend(name: str, controller: str, torch_run: dict, request: pytest.FixtureRequest) -> None:
    runs = request.getfixturevalue("hvd_runs" if controller == "gloo" else "mpi_runs")
    line = (f"backend=horovod world_size=2 device=cpu controller={controller} "
            "gradients=hvd.DistributedOptimizer(compression=none)")
    assert line in _stdout_of(runs, name), runs[1][-3000:]
    hvd = load_checkpoint(runs[0] / name)  # written by rank 0
    assert hvd["world_size"] == 2
    assert_same_weights(hvd["model"], torch_run["model"], atol=1e-5)
    rec, ref = hvd["records"][0], torch_run["records"][0]
    assert rec["train_loss"] == pytest.approx(ref["train_loss"], abs=1e-5)
    # every gradient once, in float32, by the ring model: the bytes of DDP's buckets; and C was measured
    assert rec["bytes_per_iter"] == pytest.approx(ref["bytes_per_iter"], rel=1e-9) and rec["bytes_per_iter"] > 0
    assert rec["C_s"] > 0


@needs_horovod
@pytest.mark.parametrize("name", list(CROSS_BACKEND))
def test_certified_training_with_a_pgd_point_matches_the_torch_backend(name: str, hvd_runs: tuple[Path, str],
                                                                        torch_onebit: Path) -> None:
    """MTL-IBP and SABR: the attack, the bounds and the gradient exchange give the torch backend's weights."""
    hvd, ref = load_checkpoint(hvd_runs[0] / name), load_checkpoint(torch_onebit / name)
    assert hvd["world_size"] == 2 and ref["world_size"] == 2
    assert_same_weights(hvd["model"], ref["model"], atol=1e-5)
    assert hvd["records"][0]["VA"] == ref["records"][0]["VA"]


@needs_horovod
def test_onebit_adam_takes_the_torch_backends_steps_and_resumes_exactly(hvd_runs: tuple[Path, str],
                                                                        torch_onebit: Path) -> None:
    """1-bit Adam's own exchange over Horovod's collectives: the torch backend's weights (1e-5) and bytes after the
    warm-up and the compressed epoch; a run resumed after its first epoch ends where the uninterrupted one does."""
    assert "gradients=OnebitAdam's own exchange" in _stdout_of(hvd_runs, "onebit_adam")
    hvd, ref = load_checkpoint(hvd_runs[0] / "onebit_adam"), load_checkpoint(torch_onebit / "ddp")
    assert_same_weights(hvd["model"], ref["model"], atol=1e-5)
    for rec, want in zip(hvd["records"], ref["records"]):
        assert rec["bytes_per_iter"] == pytest.approx(want["bytes_per_iter"], rel=1e-9)
    assert_same_weights(load_checkpoint(hvd_runs[0] / "onebit_part")["model"], hvd["model"], atol=0.0)


@needs_horovod
def test_distributed_optimizer_bytes_per_iter_match_the_socket_writes(hvd_runs: tuple[Path, str]) -> None:
    """hvd.DistributedOptimizer's allreduces (Horovod's own ring over gloo): each worker's socket writes during
    training = its bytes_per_iter x steps within 10% (``tests/helpers/wire.py``), on the run with a large gradient."""
    from helpers.wire import wire_records

    recs = [r for r in wire_records(hvd_runs[0]) if r["run"] == "wide"]
    assert sorted(r["rank"] for r in recs) == [0, 1] and all(r["steps"] == 3 for r in recs), recs
    ratios = [r["written"] / r["steps"] / r["bytes_per_iter"] for r in recs]
    assert all(0.9 <= x <= 1.1 for x in ratios), ratios
    # the same gradient bytes as the torch backend's DDP would count: every float32 gradient once, ring model
    weights = load_checkpoint(hvd_runs[0] / "wide")["model"]
    numel = sum(v.numel() for k, v in weights.items() if not k.startswith("normalize."))  # not the mean/std buffers
    assert recs[0]["bytes_per_iter"] == 4 * numel  # 2 (M-1)/M = 1 with 2 workers


@needs_horovod
def test_the_semisup_teacher_trains_on_horovod_with_compression(hvd_runs: tuple[Path, str]) -> None:
    out = hvd_runs[0] / "semisup_int8"
    teacher = json.loads((out / "teacher" / "results.json").read_text())
    final = json.loads((out / "results.json").read_text())["final"]
    fp32 = load_checkpoint(hvd_runs[0] / "none")["records"][0]["bytes_per_iter"]
    assert teacher["final"]["backend"] == "horovod" and teacher["final"]["world_size"] == 2
    assert len(teacher["epochs"]) == 2 and final["teacher_epochs"] == 2 and (out / "teacher.pt").is_file()
    # the same model and compressor as the student: int8's bytes, well under the float32 allreduce's
    bytes_t = [r["bytes_per_iter"] for r in teacher["epochs"]]
    assert all(0 < b < 0.7 * fp32 for b in bytes_t), (bytes_t, fp32)
    assert bytes_t[0] == pytest.approx(load_checkpoint(out)["records"][0]["bytes_per_iter"], rel=1e-9)


@needs_horovod
def test_grad_clip_is_active_in_the_equality_runs(torch_run: dict, tmp_path: Path) -> None:
    """The clipping threshold of the equality runs does clip (else the synchronize-then-clip order is untested)."""
    from helpers.runs import train_inprocess

    out = tmp_path / "noclip"
    train_inprocess([*STEPS, f"train.output_dir={out}"])  # 1 worker, the same global batch, no clipping
    free = load_checkpoint(out)["model"]
    diff = max((free[k] - torch_run["model"][k]).abs().max().item() for k in free)
    assert diff > 1e-3, f"grad_clip=0.05 changed the weights by only {diff}"


class _TwoEchoWorkers:
    """Collectives of 2 workers that hold the same data: the shapes (so the bytes) of a real exchange."""

    rank, world_size = 0, 2

    def all_reduce(self, t, op="sum"):
        return t

    def all_gather(self, t):
        return torch.stack([t, t])

    def all_to_all(self, t):
        return t


def _predicted_bytes_per_step(extra: list[str]) -> float:
    """Bytes one of 2 workers sends per step with compression ``extra``: the compressor's exchange on the tiny
    model's gradient buckets, counted by ``datkit.compress``'s ring model (no Horovod involved)."""
    from datkit.compress import ByteCounter, CountingCollectives, GradientBuckets, compressor_from_config
    from datkit.config import load_config
    from datkit.data import DATASETS
    from datkit.engine import build_model

    cfg = load_config(None, [*TINY, *extra])
    model = build_model(cfg, DATASETS.get(cfg.data.name))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    comp, counter = compressor_from_config(cfg.compression, seed=0), ByteCounter()
    coll = CountingCollectives(_TwoEchoWorkers(), counter)
    GradientBuckets(list(model.parameters()), cfg.dist.bucket_cap_mb).reduce(lambda f, k: comp.reduce_mean(f, coll, k))
    return counter.reset()


@needs_horovod
@pytest.mark.parametrize("name, max_ratio", [("fp16", 0.5), ("int8_two_sided", 0.3), ("onebit", 0.1)])
def test_training_with_compression(name: str, max_ratio: float, torch_run: dict, hvd_runs: tuple[Path, str]) -> None:
    via = "hvd.DistributedOptimizer(compression=fp16)" if name == "fp16" else "over hvd.alltoall/allgather"
    assert via in _stdout_of(hvd_runs, name), hvd_runs[1][-3000:]
    rec = json.loads((hvd_runs[0] / name / "results.json").read_text())["epochs"][0]
    fp32 = torch_run["records"][0]["bytes_per_iter"]  # the float32 allreduce of the same gradients
    # fp16 goes through Horovod's Compression.fp16 (half of float32), int8/onebit through datkit's exchange
    predicted = 0.5 * fp32 if name == "fp16" else _predicted_bytes_per_step(RUNS[name])
    assert rec["bytes_per_iter"] == pytest.approx(predicted, rel=1e-9), (rec["bytes_per_iter"], predicted, fp32)
    assert rec["bytes_per_iter"] <= max_ratio * fp32 * (1 + 1e-9), (rec["bytes_per_iter"], fp32)
    assert rec["C_s"] > 0 and rec["TA"] is not None


# --- collectives and compressors: both helper scripts in one launch --------------------------------
_CHECKS = """
import sys
from pathlib import Path
import collective_checks, compress_checks
collective_checks.main(Path(sys.argv[1]))
compress_checks.main(sys.argv[2])
"""


@pytest.fixture(scope="module")
def checks_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tests/helpers/collective_checks.py`` then ``compress_checks.py`` on 2 Horovod workers."""
    if not HAVE_HOROVOD:
        pytest.skip(NO_HOROVOD)
    tmp = tmp_path_factory.mktemp("hvd_checks")
    proc = _horovodrun(["-c", _CHECKS, str(tmp), str(tmp / "res.json")], tmp, DATKIT_TEST_BACKEND="horovod",
                       PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "helpers"), str(REPO / "tests")]))
    assert proc.returncode == 0, describe(proc)
    return tmp


@pytest.mark.parametrize("name", ["allreduce", "none", "fp16", "bf16", "int8_one", "int8_two"])
def test_counted_bytes_match_the_socket_writes(checks: dict, name: str) -> None:
    """test_compress_dist's wire check on Horovod's collectives (hvd.allreduce / alltoall / allgather), but onebit:
    its 4 MB gradient's exchange carries ~135 KB, next to which the negotiation Horovod's background thread writes
    every 1 ms cycle during the exchange (~18 KB here; bytes_per_iter leaves it out) is 13%."""
    assert 0.9 <= checks[f"written_ratio_{name}"] <= 1.1, checks[f"written_ratio_{name}"]


@needs_horovod
def test_collectives(checks_run: Path) -> None:
    results = read_results(checks_run, 2)
    assert results == {0: "ok", 1: "ok"}, f"collectives failed: {results}"
    assert "controller=gloo" in json.loads((checks_run / "describe0").read_text())


@pytest.fixture(scope="module")
def checks(checks_run: Path) -> dict:
    """The compressor checks' results: the fixture of the tests imported from ``test_compress_dist``."""
    res = json.loads((checks_run / "res.json").read_text())
    assert res["world_size"] == 2
    return res


# --- bad input ----------------------------------------------------------------------------------------
@needs_horovod
def test_without_horovodrun_fails_with_the_launch_command(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_python(["-m", "datkit.train", "backend=horovod", f"train.output_dir={out}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, describe(proc)
    assert ("horovodrun -np 2 -H localhost:2 --gloo python -m datkit.train backend=horovod"
            in proc.stderr), describe(proc)
    assert "backend=torch" in proc.stderr and "Traceback" not in proc.stderr, describe(proc)
    assert not out.exists()


def test_missing_horovod_says_how_to_install(tmp_path: Path) -> None:
    script = ("import sys; sys.modules['horovod'] = None\n"
              "from datkit.train import main\nmain(['backend=horovod'])\n")
    proc = run_python(["-c", script], cwd=tmp_path, timeout=120, HOROVOD_RANK="0")  # as if under horovodrun
    assert proc.returncode == 2, describe(proc)
    assert "launchers/install_horovod.sh" in proc.stderr and "backend=torch" in proc.stderr, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)


@pytest.mark.parametrize("env, mpi_built, expected", [
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"}, False, None),
    ({"HOROVOD_CONTROLLER": "mpi", "OMPI_COMM_WORLD_RANK": "0"}, True, None),
    ({"OMPI_COMM_WORLD_RANK": "0"}, True, None),
    ({"PMIX_RANK": "0"}, False, "built without MPI"),
    ({}, False, "horovodrun -np 2"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, True, "horovodrun -np 2"),
])
def test_launch_problem(env: dict, mpi_built: bool, expected: str | None) -> None:
    from datkit.backends.horovod_backend import launch_problem

    problem = launch_problem(env, mpi_built)
    assert (problem is None) if expected is None else (expected in problem), problem


def test_rank_0_advertises_a_reachable_address() -> None:
    """The heart-beat store's address: horovodrun's name for the host; under MPI launchers, which set none, the address
    of the interface the launcher's transport uses (``--mca btl_tcp_if_include``), else of this host's name."""
    from datkit.backends.horovod_backend import advertised_address

    assert advertised_address({"HOROVOD_HOSTNAME": "10.1.2.3", "OMPI_MCA_btl_tcp_if_include": "lo"}) == "10.1.2.3"
    assert advertised_address({"OMPI_MCA_btl_tcp_if_include": "nosuchif0,lo"}) == "127.0.0.1"
    assert advertised_address({"OMPI_MCA_btl_tcp_if_include": "10.0.0.0/8", "GLOO_SOCKET_IFNAME": "lo"}) == "127.0.0.1"
    assert advertised_address({}) != ""


@needs_horovod
def test_install_script_is_idempotent(tmp_path: Path) -> None:
    """Horovod already installed for this torch: the script says so and builds nothing (seconds)."""
    proc = subprocess.run(["bash", str(REPO / "launchers" / "install_horovod.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, describe(proc)
    assert "already installed" in proc.stderr, describe(proc)
