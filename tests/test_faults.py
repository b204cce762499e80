"""Faults that lose nothing: a lost worker, a restart from the last checkpoint, a killed checkpoint write.

- SIGKILL of one of 3 workers mid-epoch under each launcher (torchrun: rank 1; horovodrun and deepspeed: rank 0,
  the host of the heart-beat store): every process of the job is gone within 120 s (far below the 600 s
  collective timeout), the launcher exits non-zero, and every survivor says ``datkit: lost worker rank R (host
  ..., pid ...)`` and exits with code 3 (each worker's own code, written by ``helpers/record_exit.py``); a frozen
  rank 1 (SIGSTOP, no error anywhere) is named within ``dist.peer_timeout_s`` instead of the 600 s collective
  timeout;
- ``torchrun --max-restarts 1`` (torch and DeepSpeed backends): the job restarts from the last complete
  checkpoint and its final weights equal an uninterrupted run's exactly;
- SIGKILL inside a checkpoint write leaves the previous checkpoint loadable, and a resume works.

Faults are injected with the test-only hooks of ``datkit.engine.fault_injection`` and
``datkit.checkpoint`` (environment variables). Everything runs on loopback (gloo, CPU), no root needed.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers.launch_watch import process_tree, session_pids, watch_launch
from helpers.ports import reserve_port
from helpers.runs import REPO, TINY, assert_same_weights, describe, load_checkpoint, run_python

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

RUN = ["train.epochs=2", "train.max_steps=4", "optim.name=sgd", "optim.lr=0.05", "schedule.name=constant"]
KILL = {"DATKIT_TEST_KILL_AT_STEP": "1:1:2"}  # rank 1, epoch 1, step 2
LOST = r"datkit: lost worker rank 1 \(host [^)]*\), pid \d+\): (.*); this worker \(rank 0, .*exit code 3"


def _tiny() -> list[str]:
    return [a for a in TINY if not a.startswith("backend=")]


def _horovod() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


RECORD_EXIT = REPO / "tests" / "helpers" / "record_exit.py"  # runs datkit.train, writes the worker's exit code


def _torchrun(n: int, entry: list[str]) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *entry, "backend=torch"]


def _horovodrun(n: int, entry: list[str]) -> list[str]:
    return ["-m", "horovod.runner.launch", "-np", str(n), "-H", f"localhost:{n}", "--gloo", sys.executable, *entry,
            "backend=horovod"]


def _deepspeed_cmd(n: int, entry: list[str]) -> list[str]:
    script = entry[0] if entry[0] != "-m" else str(REPO / "datkit" / "train.py")
    return ["-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port", str(reserve_port()), script,
            "backend=deepspeed"]


LAUNCHERS = {
    "torch": (_torchrun, None),
    "horovod": (_horovodrun, None if _horovod() else "needs Horovod (launchers/install_horovod.sh)"),
    "deepspeed": (_deepspeed_cmd, None if _deepspeed() else "needs DeepSpeed (pip install -e '.[deepspeed]')"),
}


def launch_cmd(backend: str, workers: int = 2, record_exit: bool = False) -> list[str]:
    """The launcher command line of ``backend`` with ``workers`` workers on this host (skips when it is not
    installed); ``record_exit``: the workers run ``tests/helpers/record_exit.py``, which writes each worker's exit
    code to ``$DATKIT_TEST_EXIT_LOG/<rank>`` (read them with ``exit_codes``)."""
    make, missing = LAUNCHERS[backend]
    if missing:
        pytest.skip(missing)
    return make(workers, [str(RECORD_EXIT)] if record_exit else ["-m", "datkit.train"])


def exit_codes(folder: Path) -> dict[int, int]:
    """rank -> exit code of the workers started with ``launch_cmd(..., record_exit=True)`` (a worker killed by a
    signal has none)."""
    return {int(f.name): int(f.read_text()) for f in folder.iterdir()}


# The recovery tests (restart, relaunch, killed checkpoint write) all train this run and compare with the same
# uninterrupted run per backend, launched once for the module (``reference``).
EXACT = ["train.epochs=2", "train.max_steps=3", "optim.name=adam", "schedule.name=cosine", "train.checkpoint_every=1",
         "train.resume=true"]


def exact_cmd(backend: str | None) -> list[str]:
    """The command (fresh master port) of the recovery tests' run: one process, or 2 workers under ``backend``'s
    launcher."""
    return ["-m", "datkit.train", *TINY, *EXACT] if backend is None else [*launch_cmd(backend), *_tiny(), *EXACT]


def run_exact(backend: str | None, out: Path, cwd: Path, timeout: float = 300):
    """Run the recovery tests' run to completion (or resume it) in ``out``; the finished process."""
    cmd = exact_cmd(backend)
    try:
        return run_python([*cmd, f"train.output_dir={out}"], cwd=cwd, timeout=timeout)
    finally:
        remove_deepspeed_shm(cmd)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str | None], dict]:
    """``reference(backend)``: the final checkpoint of the uninterrupted run, launched on first use (then cached)."""
    cache: dict[str | None, dict] = {}

    def get(backend: str | None) -> dict:
        if backend not in cache:
            tmp = tmp_path_factory.mktemp(f"reference-{backend or 'one_process'}")
            proc = run_exact(backend, tmp / "full", tmp)
            assert proc.returncode == 0, describe(proc)
            cache[backend] = load_checkpoint(tmp / "full")
            assert cache[backend]["epoch"] == 2
        return cache[backend]

    return get


def assert_equals_reference(run: dict, ref: dict) -> None:
    """Same epoch, bit-equal weights and the same per-epoch training losses as the uninterrupted run."""
    assert run["epoch"] == ref["epoch"] == 2
    assert_same_weights(run["model"], ref["model"], atol=0.0)
    assert [r["epoch"] for r in run["records"]] == [1, 2]
    assert [r["train_loss"] for r in run["records"]] == [r["train_loss"] for r in ref["records"]]


def remove_deepspeed_shm(cmd: list[str]) -> None:
    """DeepSpeed's CPU allreduce keeps a 69 MB ``/dev/shm`` buffer per worker, named by the master port,
    that a killed (or exiting) worker leaves behind: remove those of the launch ``cmd``."""
    if "--master_port" in cmd:
        port = cmd[cmd.index("--master_port") + 1]
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            f.unlink(missing_ok=True)


# One launch per launcher, 3 workers: under torchrun rank 1 dies (the store is torchrun's agent's); under horovodrun
# and deepspeed rank 0 dies -- the rank that hosts the store of the heart-beats (and, under deepspeed, of
# torch.distributed's rendezvous). The three launches run at the same time (most of each is start-up and waiting).
KILLED = {"torch": 1, "horovod": 0, "deepspeed": 0}


@pytest.fixture(scope="module")
def kills(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """backend -> (Launch, folder of the workers' exit codes), for the selected tests' backends."""
    from concurrent.futures import ThreadPoolExecutor

    selected = [b for b in KILLED if not LAUNCHERS[b][1] and any(
        getattr(getattr(item, "callspec", None), "params", {}).get("backend") == b
        for item in request.session.items if getattr(item, "module", None) is request.module
        and item.originalname == "test_sigkill_of_one_of_3_workers_names_it_and_every_survivor_exits_3")]

    tmps = {b: tmp_path_factory.mktemp(f"kill-{b}") for b in selected}  # not in the threads: mktemp is not thread-safe

    def launch(backend: str):
        tmp = tmps[backend]
        cmd, codes = launch_cmd(backend, workers=3, record_exit=True), tmp / "codes"
        codes.mkdir()
        try:
            out = watch_launch([*cmd, *_tiny(), *RUN, "train.batch_size=30", f"train.output_dir={tmp / 'out'}"], tmp,
                               timeout=300, DATKIT_TEST_KILL_AT_STEP=f"{KILLED[backend]}:1:2",
                               DATKIT_TEST_EXIT_LOG=str(codes))
        finally:
            remove_deepspeed_shm(cmd)
        return out, codes, tmp

    with ThreadPoolExecutor(3) as pool:
        return dict(zip(selected, pool.map(launch, selected)))


@pytest.mark.parametrize("backend", list(KILLED))
def test_sigkill_of_one_of_3_workers_names_it_and_every_survivor_exits_3(backend: str, kills: dict) -> None:
    if backend not in kills:
        pytest.skip(LAUNCHERS[backend][1] or "not selected")
    killed = KILLED[backend]
    out, codes, tmp_path = kills[backend]
    hit = out.first(rf"datkit-test: rank {killed} \(pid (\d+)\) sends itself SIGKILL at epoch 1 step 2")
    assert hit is not None, out.describe()
    assert out.returncode not in (None, 0), out.describe()
    # nothing hangs: far below the 600 s collective timeout that would end the job without the watch (generous:
    # a loaded 2-core machine takes seconds per process to tear down)
    assert out.exited_at - hit[0] < 120 and not out.left_over, out.describe()
    survivors = sorted({0, 1, 2} - {killed})
    # every survivor's own exit code is 3; the killed worker wrote none (SIGKILL)
    assert exit_codes(codes) == dict.fromkeys(survivors, 3), out.describe()
    # every survivor names the killed rank, by its pid: "its process is gone" (a survivor that looks after another
    # survivor already stopped may name that one too: from outside, an exit is an exit)
    named = {int(m.group(3)) for _, line in out.lines
             for m in [re.search(rf"datkit: lost worker rank {killed} \(host [^)]*\), pid (\d+)\): (.*?); this worker "
                                 r"\(rank (\d+), .*stops with exit code 3", line)]
             if m and m.group(1) == hit[1].group(1) and m.group(2) == "its process is gone"}
    assert named == set(survivors), out.describe()
    if backend == "torch":  # torchrun's own summary: the survivors' exit codes as the OS reported them
        summary = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*exitcode\s*: (-?\d+)", out.text)
        assert sorted(summary) == sorted([(str(r), "3") for r in survivors] + [(str(killed), "-9")]), out.describe()
    # horovodrun's summary is not checked per survivor: its gloo runner terminates the other processes as soon as the
    # first one exits non-zero (CI, 2026-12-03: rank 0's SIGKILL, then "exited with non-zero status ... Exit code: 137"
    # with no line for the survivors), so only the workers' own records above are reliable.
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_frozen_worker_is_named_after_peer_timeout(tmp_path: Path) -> None:
    """SIGSTOP: the peer's sockets stay open, no collective fails; only the silent heart-beat shows it."""
    frozen: list[int] = []

    def kill_frozen(t: float, line: str, pid: int) -> None:  # once rank 0 has reported, end the frozen process
        if "datkit: lost worker rank 1" in line and frozen:
            os.kill(frozen[0], signal.SIGKILL)
        elif "sends itself SIGSTOP" in line:
            frozen.append(int(line.split("(pid ")[1].split(")")[0]))

    out = watch_launch([*launch_cmd("torch"), *_tiny(), *RUN, "dist.peer_timeout_s=4",
                        f"train.output_dir={tmp_path / 'out'}"], tmp_path, timeout=200, on_line=kill_frozen,
                       DATKIT_TEST_KILL_SIGNAL="STOP", **KILL)
    stopped, lost = out.first("sends itself SIGSTOP"), out.first(LOST)
    assert stopped is not None and lost is not None, out.describe()
    assert lost[1].group(1).startswith("no heart-beat for"), out.describe()
    # dist.peer_timeout_s (4 s, counted from the last heart-beat seen, up to one 0.8 s interval before the freeze:
    # never sooner than 3.2 s), not dist.timeout_s (600 s); the upper bound leaves a loaded machine 10x the timeout
    assert 3 <= lost[0] - stopped[0] < 40, out.describe()
    assert out.returncode not in (None, 0) and not out.left_over, out.describe()


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_torchrun_restart_resumes_from_the_last_checkpoint_exactly(backend: str, reference, tmp_path: Path) -> None:
    """torchrun restarts the job; the DeepSpeed backend runs under torchrun as well (its own launcher has no restarts).
    The reference is the uninterrupted run under the backend's own launcher (for DeepSpeed: ``deepspeed``)."""
    if LAUNCHERS[backend][1]:
        pytest.skip(LAUNCHERS[backend][1])
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = watch_launch([*torchrun, "--max-restarts=1", "-m", "datkit.train", f"backend={backend}", *_tiny(), *EXACT,
                        f"train.output_dir={tmp_path / 'restarted'}"], tmp_path,
                       timeout=300, DATKIT_TEST_KILL_AT_STEP="1:2:1")  # mid-epoch 2, after epoch 1's checkpoint
    assert out.returncode == 0, out.describe()
    assert out.first("sends itself SIGKILL at epoch 2 step 1") and out.first(LOST), out.describe()
    assert out.first(r"datkit: resumed from .*checkpoint_last.pt after epoch 1"), out.describe()
    assert_equals_reference(load_checkpoint(tmp_path / "restarted"), reference(backend))


@pytest.mark.parametrize("backend", ["horovod", "deepspeed"])
def test_relaunch_with_resume_after_a_lost_worker_is_exact(backend: str, reference, tmp_path: Path) -> None:
    """The recovery for launchers without restarts (horovodrun without elastic, deepspeed): the job stops with
    the lost worker named; the same command again with ``train.resume=true`` ends with the uninterrupted run's
    weights."""
    cmd = exact_cmd(backend)
    try:
        killed = watch_launch([*cmd, f"train.output_dir={tmp_path / 'again'}"], tmp_path, timeout=300,
                              DATKIT_TEST_KILL_AT_STEP="1:2:1")
    finally:
        remove_deepspeed_shm(cmd)
    assert killed.returncode not in (None, 0) and killed.first(LOST), killed.describe()
    again = run_exact(backend, tmp_path / "again", tmp_path)  # the same command (a fresh master port)
    assert again.returncode == 0, describe(again)
    assert ("resumed from" in again.stdout + again.stderr
            and "after epoch 1" in again.stdout + again.stderr), describe(again)
    assert_equals_reference(load_checkpoint(tmp_path / "again"), reference(backend))


@pytest.mark.parametrize("backend", [None, "torch", "horovod", "deepspeed"], ids=["one_process", "torch", "horovod",
                                                                             "deepspeed"])
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(backend: str | None, reference,
                                                                  tmp_path: Path) -> None:
    """The whole job (launcher and every worker) is SIGKILLed while rank 0 writes epoch 2's checkpoint; the previous
    one loads, and a resume from it ends with the uninterrupted run's weights."""
    import torch

    run = tmp_path / "run"
    writes: list[int] = []

    def kill_in_second_write(t: float, line: str, pid: int) -> None:
        if "datkit-test: checkpoint temp file written" in line:  # horovodrun prefixes lines with [1,0]<stderr>:
            writes.append(1)
            if len(writes) == 2:  # epoch 2's checkpoint is on disk under its temp name, not yet renamed
                for p in {*process_tree(pid), *session_pids(pid)}:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    launch = exact_cmd(backend)
    try:
        out = watch_launch([*launch, f"train.output_dir={run}"], tmp_path, timeout=240,
                           on_line=kill_in_second_write, DATKIT_TEST_CHECKPOINT_WRITE_DELAY_S="3")
    finally:
        remove_deepspeed_shm(launch)
    assert out.returncode == -signal.SIGKILL and len(writes) == 2, out.describe()
    assert list(run.glob(".tmp-*.pt")), sorted(p.name for p in run.iterdir())  # killed inside the write window
    previous = torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert previous["epoch"] == 1

    resumed = run_exact(backend, run, tmp_path, timeout=240)
    assert resumed.returncode == 0, describe(resumed)
    said = resumed.stdout + resumed.stderr
    assert "resumed from" in said and "after epoch 1" in said, describe(resumed)
    assert not list(run.glob(".tmp-*.pt"))  # the leftover of the killed write is cleaned up by the next save
    # the uninterrupted run was started like these (a subprocess: same thread count, so bit-equal weights)
    assert_equals_reference(load_checkpoint(run), reference(backend))


def test_sigusr1_on_one_worker_stops_both_after_the_same_step_exit_75_and_resume_is_exact(reference,
                                                                                          tmp_path: Path) -> None:
    """Preemption (``datkit.engine.preemption``): rank 1 alone gets SIGUSR1 before step 0 of epoch 2; both workers stop
    after that step (agreed in the step's all-gather), rank 0 writes the mid-epoch checkpoint, each worker exits 75
    (torchrun itself then exits 1: a child failed); the same command again continues at step 1 of epoch 2 and ends
    with the uninterrupted run's weights bit for bit."""
    cmd, codes, out = launch_cmd("torch", record_exit=True), tmp_path / "codes", tmp_path / "cut"
    codes.mkdir()
    cut = watch_launch([*cmd, *_tiny(), *EXACT, f"train.output_dir={out}"], tmp_path, timeout=300,
                       DATKIT_TEST_SIGNAL_AT_STEP="1:2:0", DATKIT_TEST_EXIT_LOG=str(codes))
    assert exit_codes(codes) == {0: 75, 1: 75}, cut.describe()
    assert cut.returncode == 1 and not cut.left_over, cut.describe()
    assert cut.first(r"datkit: got SIGUSR1 on rank 1: checkpoint after epoch 2 step 0 written to .*checkpoint_last.pt; "
                     r"exit 75 \(requeue and resume with train.resume=true\)"), cut.describe()
    state = load_checkpoint(out)
    assert (state["epoch"], state["mid_epoch"]["epoch"], state["mid_epoch"]["next_step"]) == (1, 2, 1)
    assert len(state["mid_epoch"]["ranks"]["rng"]) == 2
    again = run_exact("torch", out, tmp_path)
    assert again.returncode == 0, describe(again)
    assert "in epoch 2 after step 0 (mid-epoch)" in again.stdout, describe(again)
    assert_equals_reference(load_checkpoint(out), reference("torch"))


def test_preemption_with_onebit_adam_and_grad_accum_resumes_exactly(tmp_path: Path) -> None:
    """The states that cross steps beyond the model's: 1-bit Adam's error-feedback residuals (per worker, past its
    freeze step: ceil(0.25 * 6) = 2), micro-batches (``train.grad_accum=2``) and each rank's global RNG (a model with
    dropout). SIGTERM on rank 0 before step 1 of epoch 2; the resumed run ends with an uninterrupted run's weights bit
    for bit."""
    extra = ["optim.name=onebit_adam", "train.grad_accum=2",
             "train.nonfinite=ignore",  # ignore: the signals' all-gather
             "model.name=helpers.good_plugins:dropout_mlp"]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))}
    full = run_python([*exact_cmd("torch"), *extra, f"train.output_dir={tmp_path / 'full'}"], cwd=tmp_path, timeout=300,
                      **env)
    assert full.returncode == 0, describe(full)
    cmd, out = [*exact_cmd("torch"), *extra, f"train.output_dir={tmp_path / 'cut'}"], tmp_path / "cut"
    cut = run_python(cmd, cwd=tmp_path, timeout=300, DATKIT_TEST_SIGNAL_AT_STEP="0:2:1", DATKIT_TEST_SIGNAL="TERM",
                     **env)
    assert cut.returncode == 1 and "datkit: got SIGTERM on rank 0: checkpoint after epoch 2 step 1" in cut.stdout, \
        describe(cut)
    state = load_checkpoint(out)
    assert state["mid_epoch"]["next_step"] == 2 and state["optimizer_exchange"]["world_size"] == 2
    again = run_python([*exact_cmd("torch"), *extra, f"train.output_dir={out}"], cwd=tmp_path, timeout=300, **env)
    assert again.returncode == 0 and "in epoch 2 after step 1 (mid-epoch)" in again.stdout, describe(again)
    assert_equals_reference(load_checkpoint(out), load_checkpoint(tmp_path / "full"))
