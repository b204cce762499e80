"""A real Slurm cluster on emulated hosts (``python -m datkit.netemu slurm``) running launchers/slurm_*.sbatch as
written.

One 2-node cluster for the module (munge, slurmctld, 2 slurmds in their namespaces). Each sbatch script runs a tiny job
across both nodes (1 worker per node: ``--gpus-per-node=1``, the stand-in GPUs) and its final weights equal, exactly,
those of the same job under the plain one-host launcher with the same world size (torchrun_local.sh,
horovodrun_local.sh, deepspeed_local.sh). The requeue mechanics: SIGUSR1 to the batch shell (what
``--signal=B:USR1@120`` sends before the time limit) stops the step, the script requeues the job, the second run
resumes (train.resume=true) and ends with the uninterrupted run's weights. ``slurm down`` leaves no process,
namespace or file behind.

Root only (network namespaces, daemons); skipped with the reason elsewhere. Slurm jobs are polled with scontrol (sbatch
--wait polls too slowly) and a requeued job's 2-minute BeginTime delay (Slurm's) is skipped with StartTime=now once
every node is idle again and 2 s have passed (sooner, slurmd rejects the second run's credential: FAILED).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datkit.netemu import slurm as S
from datkit.netemu.hosts import NEEDS, NetemuError, Topology, existing_namespaces, ns_pids
from datkit.netemu.slurm_conf import state_dir
from helpers.ports import reserve_port
from helpers.runs import (
    REPO,
    TINY,
    assert_same_weights,
    child_env,
    describe,
    installed,
    load_checkpoint,
    no_horovod_mpi,
)

REASON = S.slurm_available()
needs_slurm = pytest.mark.skipif(REASON is not None, reason=REASON or NEEDS)
ARGS = [a for a in TINY if not a.startswith("backend=")] + ["train.epochs=2", "train.max_steps=4"]
HOLD = {"DATKIT_TEST_HOLD_AT_STEP": "0:1:2"}  # rank 0 waits before epoch 1's step 2 until the scheduler's signal
BIN = str(Path(sys.executable).parent)
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _prefix(tag: str) -> str:
    return f"t{os.getpid() % 100000}{tag}"



def _env(prefix: str, **extra: str) -> dict[str, str]:
    """A job's environment (sbatch exports it): this checkout first on PYTHONPATH, this Python, the hosts' NIC."""
    base = child_env(PYTHON=sys.executable, NIC=f"{prefix}eth", PATH=f"{BIN}:{os.environ.get('PATH', '')}",
                     PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), **extra)
    return S.client_env(prefix, base)


def submit(prefix: str, script: str, args: list[str], log: Path, *sbatch: str, **env: str) -> str:
    """``sbatch --nodes=2 --gpus-per-node=1 ... launchers/<script> args`` from the repo root; returns the job id."""
    proc = subprocess.run(S.client_argv(prefix, ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1",
                                                 "--gpus-per-node=1", "--cpus-per-task=1", f"--output={log}", *sbatch,
                                                 f"launchers/{script}", *args]),
                          cwd=REPO, env=_env(prefix, **env), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, describe(proc)
    return proc.stdout.strip().split(";")[0]


def job(prefix: str, job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
    out = S.client(prefix, "scontrol", "show", "job", "-o", job_id).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_job(prefix: str, job_id: str, log: Path, timeout: float = 180, skip_requeue_delay: bool = True) -> dict:
    """Poll until the job ends (a requeued job is made eligible at once); the final record, the log on failure."""
    deadline, requeued = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        rec = job(prefix, job_id)
        if rec.get("JobState") in DONE:
            return rec
        if skip_requeue_delay and rec.get("JobState") == "PENDING" and rec.get("Reason") == "BeginTime":
            requeued = requeued or time.monotonic()
            # not in the second of the requeue (slurmd rejects credentials of the second their job's were revoked:
            # "Job credential revoked") and not before the first run is over on every node
            if time.monotonic() - requeued > 2 and set(S.node_states(prefix).values()) == {"idle"}:
                S.client(prefix, "scontrol", "update", f"JobId={job_id}", "StartTime=now")
        time.sleep(0.3)
    S.client(prefix, "scancel", job_id)
    pytest.fail(f"job {job_id} still {job(prefix, job_id).get('JobState')} after {timeout} s\n{_tail(log)}")


def _tail(log: Path, n: int = 6000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else f"(no {log})"


def run_sbatch(prefix: str, script: str, out: Path, *sbatch: str, **env: str) -> tuple[dict, str]:
    log = out.parent / f"{out.name}.log"
    rec = wait_job(prefix, submit(prefix, script, [*ARGS, f"train.output_dir={out}"], log, *sbatch, **env), log)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", f"{rec}\n{_tail(log)}"
    return rec, log.read_text()


def plain(launcher: str, out: Path) -> None:
    """The same job under ``launchers/<launcher>`` with 2 workers on this host (root namespace, loopback)."""
    proc = subprocess.run(["bash", str(REPO / "launchers" / launcher), "2", *ARGS, f"train.output_dir={out}"], cwd=REPO,
                          env=child_env(PYTHON=sys.executable, PATH=f"{BIN}:{os.environ.get('PATH', '')}",
                                        MASTER_PORT=str(reserve_port())),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, describe(proc)


def same_run(slurm_out: Path, plain_out: Path) -> None:
    """Both runs have world size 2 and the same final weights, bit for bit."""
    for o in (slurm_out, plain_out):
        assert load_checkpoint(o)["world_size"] == 2, o
    assert_same_weights(load_checkpoint(slurm_out)["model"], load_checkpoint(plain_out)["model"], atol=0.0)


@pytest.fixture(scope="module")
def cluster() -> str:
    """A 2-node cluster for the module: its prefix. Torn down (and checked gone) at the end."""
    if REASON is not None:
        pytest.skip(REASON)
    prefix = _prefix("c")
    S.up(Topology(2, "1gbit", prefix), cpus=4, gpus=2, timeout=60)
    yield prefix
    S.down(prefix)
    assert existing_namespaces(prefix) == [] and not state_dir(prefix).exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory):
    """``reference(launcher)``: the output folder of the plain run under ``launchers/<launcher>`` (run once per
    module)."""
    done: dict[str, Path] = {}

    def get(launcher: str) -> Path:
        if launcher not in done:
            done[launcher] = tmp_path_factory.mktemp("plain") / launcher.split("_")[0]
            plain(launcher, done[launcher])
        return done[launcher]

    return get


PLAIN = {"slurm_torchrun.sbatch": "torchrun_local.sh", "slurm_horovod.sbatch": "horovodrun_local.sh",
         "slurm_deepspeed.sbatch": "deepspeed_local.sh"}
NEEDS_HOROVOD = pytest.mark.skipif(not installed("horovod.torch"),
                                   reason="needs Horovod (launchers/install_horovod.sh)")
NEEDS_DEEPSPEED = pytest.mark.skipif(not installed("deepspeed"),
                                     reason="needs DeepSpeed (pip install -e '.[deepspeed]')")
SCRIPTS = [pytest.param("slurm_torchrun.sbatch", id="torchrun"),
           pytest.param("slurm_horovod.sbatch", id="horovodrun", marks=NEEDS_HOROVOD),
           pytest.param("slurm_deepspeed.sbatch", id="deepspeed", marks=NEEDS_DEEPSPEED)]
EQUAL_CASES = [pytest.param("slurm_torchrun.sbatch", {}, id="torchrun"),
               pytest.param("slurm_horovod.sbatch", {}, id="horovodrun", marks=NEEDS_HOROVOD),
               pytest.param("slurm_horovod.sbatch", {"HVD_LAUNCH": "srun"}, id="horovod-srun-pmix",
                            marks=pytest.mark.skipif(no_horovod_mpi() is not None, reason=no_horovod_mpi() or "")),
               pytest.param("slurm_deepspeed.sbatch", {}, id="deepspeed", marks=NEEDS_DEEPSPEED)]


def test_refusals_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert S.slurm_available().startswith(NEEDS)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real = S.shutil.which
    monkeypatch.setattr(S.shutil, "which", lambda t: None if t == "slurmd" else real(t))
    if real("ip") and real("tc") and subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0:
        with pytest.raises(NetemuError, match=r"slurmd not found.*install_cluster_tools\.sh"):
            S.require_slurm()
    proc = subprocess.run([sys.executable, "-m", "datkit.netemu", "slurm", "up", "--hosts", "2", "--prefix", "x" * 9],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
        describe(proc)


@needs_slurm
@pytest.mark.slow
def test_nodes_names_and_ssh_between_them(cluster: str, tmp_path: Path) -> None:
    """Each node answers to its own name, resolves the others', and the ssh shim reaches a node by name."""
    log = tmp_path / "names.log"
    cmd = (f"srun -l bash -c 'hostname; ip -o -4 addr show {cluster}eth | grep -o \"inet [0-9.]*\"'; "
           f"ssh {cluster}h1 hostname")
    proc = subprocess.run(S.client_argv(cluster, ["sbatch", "--parsable", "--nodes=2", f"--output={log}", "--wrap",
                                                  cmd]),
                          env=_env(cluster), cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, describe(proc)
    rec = wait_job(cluster, proc.stdout.strip(), log, timeout=60)
    text = log.read_text()
    assert rec["JobState"] == "COMPLETED", f"{rec}\n{text}"
    for i in range(2):
        assert f"{i}: {cluster}h{i}" in text and f"{i}: inet 198.18.0.{i + 1}" in text, text
    assert text.strip().splitlines()[-1] == f"{cluster}h1", text
    states = S.node_states(cluster)
    assert states == {f"{cluster}h0": "idle", f"{cluster}h1": "idle"}, states


def assert_requeued_mid_epoch(rec: dict, text: str, restarts: int | None) -> None:
    """The job completed after ``restarts`` requeues (None: at least one), the workers checkpointed after epoch 1's
    step 2 and exited 75, and the rerun resumed there (mid-epoch)."""
    assert rec["JobState"] == "COMPLETED", f"{rec}\n{text[-4000:]}"
    assert ((rec["Restarts"] == str(restarts)) if restarts is not None
            else int(rec["Restarts"]) >= 1), f"{rec}\n{text[-4000:]}"
    assert "checkpoint after epoch 1 step 2 written" in text and "exit 75" in text, text[-4000:]
    assert re.search(r"resumed from .*checkpoint_last\.pt in epoch 1 after step 2 \(mid-epoch\)", text), text[-4000:]


@needs_slurm
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("script", SCRIPTS)
def test_requeue_on_usr1_resumes_mid_epoch_to_the_same_weights(cluster: str, reference, script: str,
                                                                tmp_path: Path) -> None:
    """``scancel --batch --signal=USR1`` while the job is mid-epoch (rank 0 held before epoch 1's step 2:
    ``DATKIT_TEST_HOLD_AT_STEP``, test-only): the batch shell's trap sends SIGTERM to the step (srun'd launchers) or
    to horovodrun, every worker finishes the step, rank 0 writes a mid-epoch checkpoint, the workers exit 75, the
    script runs ``scontrol requeue``; the rerun resumes mid-epoch (train.resume=true), the log (--open-mode=append)
    holds both runs, and the final weights are the uninterrupted plain run's (atol 0)."""
    out, log = tmp_path / "out", tmp_path / "out.log"
    job_id = submit(cluster, script, [*ARGS, f"train.output_dir={out}"], log, **HOLD)
    deadline = time.monotonic() + 120
    while "datkit-test: rank 0 holds" not in _tail(log):
        assert time.monotonic() < deadline and job(cluster, job_id).get("JobState") not in DONE, _tail(log)
        time.sleep(0.1)
    S.client(cluster, "scancel", "--batch", "--signal=USR1", job_id)
    rec = wait_job(cluster, job_id, log)
    text = log.read_text()
    assert_requeued_mid_epoch(rec, text, restarts=1)
    assert text.count("datkit: requeueing job") == 1 and text.count("datkit: backend=") == 2, text[-4000:]
    same_run(out, reference(PLAIN[script]))


@needs_slurm
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_requeue_at_a_time_limit_mid_epoch(cluster: str, reference, tmp_path: Path) -> None:
    """A real time limit: ``sbatch --time=1 --signal=B:USR1@40`` (the scripts' own mechanism with a 1-minute limit):
    Slurm itself sends SIGUSR1 to the batch shell 20-50 s into the job while it is mid-epoch (held as above); the
    job checkpoints, requeues, resumes mid-epoch and ends with the uninterrupted run's weights (atol 0). A run that
    starts slowly may be signalled more than once (each rerun has 1 minute too): at least one requeue."""
    out, log = tmp_path / "out", tmp_path / "out.log"
    job_id = submit(cluster, "slurm_torchrun.sbatch", [*ARGS, f"train.output_dir={out}"], log, "--time=1",
                    "--signal=B:USR1@40", **HOLD)
    rec = wait_job(cluster, job_id, log, timeout=300)
    assert_requeued_mid_epoch(rec, log.read_text(), restarts=None)
    same_run(out, reference("torchrun_local.sh"))


@needs_slurm
@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("script,env", EQUAL_CASES)
def test_sbatch_equals_the_plain_launcher(cluster: str, reference, script: str, env: dict[str, str],
                                          tmp_path: Path) -> None:
    """The script as written, 2 nodes x 1 worker: torchrun (rendezvous at the first node), horovodrun (-H from the
    allocation's node names, ssh to the other node through the shim), ``HVD_LAUNCH=srun`` (srun --mpi=pmix starts
    the workers, no horovodrun), deepspeed (a hostfile per node); the final weights equal the plain one-host launch's
    with 2 workers bit for bit."""
    rec, log = run_sbatch(cluster, script, tmp_path / "out", **env)
    assert rec["Restarts"] == "0" and "world_size=2" in log, log[-3000:]
    if env.get("HVD_LAUNCH") == "srun":
        assert "horovodrun" not in log, log[-3000:]
    same_run(tmp_path / "out", reference(PLAIN[script]))


def _leftovers(prefix: str) -> list[str]:
    """Processes whose command line names the cluster (daemons, job steps, shims)."""
    out = subprocess.run(["pgrep", "-af", f"datkit-slurm-{prefix}|{prefix}h[0-9]"], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if str(os.getpid()) != line.split()[0] and "pgrep" not in line]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for this machine's init to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _sleeps(prefix: str) -> list[int]:
    found = []
    for p in (p for ns in existing_namespaces(prefix) for p in ns_pids(ns)):
        try:
            if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].endswith(b"sleep"):
                found.append(p)
        except OSError:
            pass
    return found


@needs_slurm
@pytest.mark.slow
@pytest.mark.timeout(200)
def test_down_leaves_nothing_behind(cluster: str, tmp_path: Path) -> None:
    """A second cluster, a job running on both nodes, then ``slurm down``: no daemon, job process, namespace, hosts file
    or state folder is left, a second down is a no-op, and the module's cluster (sharing munged) still works."""
    prefix = _prefix("d")
    cli = [sys.executable, "-m", "datkit.netemu", "slurm"]
    up = subprocess.run([*cli, "up", "--hosts", "2", "--prefix", prefix, "--cpus", "2", "--gpus", "1"], cwd=REPO,
                        env=child_env(), capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0 and "idle" in up.stdout, describe(up)
        proc = subprocess.run([*cli, "exec", "--prefix", prefix, "--", "sbatch", "--parsable", "--nodes=2",
                               f"--output={tmp_path / 'sleep.log'}", "--wrap", "srun sleep 300"],
                              cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, describe(proc)
        deadline = time.monotonic() + 30
        while len(_sleeps(prefix)) < 2:
            assert time.monotonic() < deadline, "the job's sleeps did not start on both nodes"
            time.sleep(0.2)
        pids = [p for ns in existing_namespaces(prefix) for p in ns_pids(ns)]
        assert len(pids) >= 6 and _leftovers(prefix), "daemons and job steps should be running"
    finally:
        down = subprocess.run([*cli, "down", "--prefix", prefix], cwd=REPO, env=child_env(), capture_output=True,
                              text=True, timeout=60)
    assert down.returncode == 0 and f"{prefix}h0" in down.stdout, describe(down)
    assert not [p for p in pids if _alive(p)], "processes of the cluster survived 'down'"
    assert _leftovers(prefix) == [], _leftovers(prefix)
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in ns and not state_dir(prefix).exists() and not list(Path("/etc/netns").glob(f"{prefix}h*"))
    again = subprocess.run([*cli, "down", "--prefix", prefix], cwd=REPO, env=child_env(), capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and "nothing left" in again.stdout, describe(again)
    assert S.node_states(cluster) == {f"{cluster}h0": "idle", f"{cluster}h1": "idle"}
