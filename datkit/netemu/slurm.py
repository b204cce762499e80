"""A real Slurm cluster on emulated hosts: ``python -m datkit.netemu slurm up|down|exec|env``.

``up`` creates the hosts (:func:`datkit.netemu.hosts.up`), makes sure munge runs (:mod:`datkit.netemu.munge`),
writes the configuration (:mod:`datkit.netemu.slurm_conf`), starts slurmctld on node 0 and one slurmd per
host, and waits until every node is idle. Each daemon runs inside its host's network namespace AND a UTS
namespace of its own whose hostname is the node name ``<prefix>h<i>`` (``unshare --uts``; the names resolve
through the ``/etc/netns/<ns>/hosts`` files of :mod:`datkit.netemu.hosts`), so slurmctld finds itself in
``SlurmctldHost``, each slurmd its ``NodeName`` (also passed as ``slurmd -N``), and job steps see their
node's hostname as on a real cluster (torchrun's rendezvous host check compares hostnames).

Clients (sbatch, squeue, scontrol, scancel, srun) run inside host 0's namespace with
``SLURM_CONF=<state>/slurm.conf`` and ``<state>/bin`` first on PATH: there an ``ssh`` shim maps node names
and addresses to their namespaces (horovodrun reaches the other nodes with ssh). :func:`client_argv` /
``slurm exec -- CMD`` do both; jobs inherit that environment (sbatch exports it).

``down`` stops the daemons, kills every process left in the hosts (job steps included), deletes the
namespaces, stops munged if this cluster started it, and removes the state folder; idempotent.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from datkit.netemu import slurm_conf as C
from datkit.netemu.hosts import NetemuError, Topology, require_tools, unavailable
from datkit.netemu.hosts import down as hosts_down
from datkit.netemu.hosts import up as hosts_up
from datkit.netemu.launch import write_ssh_shim
from datkit.netemu.munge import ensure_munged, release_munged

INSTALL = "run 'bash launchers/install_cluster_tools.sh' as root"
TOOLS = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun", "munged", "munge",
         "unmunge", "unshare", "runuser")


def require_slurm() -> None:
    """Raise :class:`NetemuError` unless this is root with iproute2, Slurm and munge (the message says how)."""
    require_tools()
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise NetemuError(f"Slurm/munge not installed ({', '.join(missing)} not found): {INSTALL}")


def slurm_available() -> str | None:
    """None when a cluster can be started here, else the reason it cannot."""
    return unavailable(require_slurm)


def in_node(topo: Topology, i: int) -> list[str]:
    """The argv prefix that runs a command as on node ``i``: its network namespace, its own hostname."""
    return ["ip", "netns", "exec", topo.host_ns(i), "unshare", "--uts", "--", "/bin/sh", "-c",
            'hostname "$0" && exec "$@"', topo.host_ns(i)]


def client_env(prefix: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) plus SLURM_CONF and the ssh shim first on PATH."""
    env = dict(os.environ if base is None else base)
    env["SLURM_CONF"] = str(C.conf_path(prefix))
    env["PATH"] = f"{C.state_dir(prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def client_argv(prefix: str, argv: list[str]) -> list[str]:
    """``argv`` run inside host 0's namespace (the environment comes from :func:`client_env`)."""
    return ["ip", "netns", "exec", f"{prefix}h0", *argv]


def client(prefix: str, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run a Slurm client command against cluster ``prefix``; output captured as text."""
    return subprocess.run(client_argv(prefix, list(argv)), env=client_env(prefix), capture_output=True, text=True,
                          timeout=timeout)


def _start(topo: Topology, i: int, argv: list[str], log: Path) -> None:
    """Start a daemon as on node ``i`` (it forks into the background); raise with its log when it fails."""
    with open(log.with_suffix(".start"), "w") as err:
        rc = subprocess.run([*in_node(topo, i), *argv], stdin=subprocess.DEVNULL, stdout=err, stderr=err).returncode
    if rc != 0:
        raise NetemuError(f"'{' '.join(argv)}' on {topo.host_ns(i)} exited {rc}:\n{_tail(log.with_suffix('.start'))}"
                          f"{_tail(log)}")


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return f"--- {path}: missing ---\n"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text) + "\n"


def logs_tail(prefix: str) -> str:
    """The end of slurmctld's and every slurmd's log (for error messages)."""
    d = C.state_dir(prefix)
    return _tail(d / "ctld" / "slurmctld.log") + "".join(_tail(n / "slurmd.log") for n in sorted(d.glob("nodes/*")))


def node_states(prefix: str) -> dict[str, str]:
    """``{node: state}`` as sinfo reports them (empty when slurmctld does not answer)."""
    proc = client(prefix, "sinfo", "-h", "-N", "-o", "%N %T")
    return dict(line.split()[:2] for line in proc.stdout.splitlines() if len(line.split()) >= 2) \
        if proc.returncode == 0 else {}


def wait_idle(topo: Topology, timeout: float = 60.0) -> None:
    """Wait until every node is idle; past ``timeout`` raise with the states and the daemons' log tails."""
    deadline, states = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        states = node_states(topo.prefix)
        if len(states) == topo.hosts and all(s == "idle" for s in states.values()):
            return
        if any(s.startswith(("inval", "drain", "fail")) for s in states.values()):
            break  # slurmctld rejected a node: its log says why
        time.sleep(0.5)
    raise NetemuError(f"Slurm nodes not idle (sinfo: {states or 'no answer'}; waited up to {timeout:.0f} s):\n"
                      + logs_tail(topo.prefix))


def up(topo: Topology, cpus: int = 8, gpus: int = 8, timeout: float = 60.0) -> Path:
    """Start cluster ``topo`` (hosts, munge, slurmctld, slurmds) and wait until its nodes are idle; returns the
    path of its ``slurm.conf``. Raises :class:`NetemuError` (after tearing down what it started) on failure."""
    require_slurm()
    if cpus < 1 or gpus < 0:
        raise NetemuError(f"--cpus {cpus} / --gpus {gpus}: at least 1 CPU and 0 GPUs per node")
    state = C.state_dir(topo.prefix)
    if state.exists():
        raise NetemuError(f"{state} exists already: run 'slurm down --prefix {topo.prefix}' first")
    hosts_up(topo)
    try:
        conf = C.write_conf(topo, cpus, gpus)
        write_ssh_shim(topo, state / "bin", hostname=True)
        ensure_munged(state)
        _start(topo, 0, ["slurmctld", "-f", str(conf)], state / "ctld" / "slurmctld.log")
        for i in range(topo.hosts):
            name = topo.host_ns(i)
            _start(topo, i, ["slurmd", "-f", str(conf), "-N", name], C.node_dir(topo.prefix, name) / "slurmd.log")
        wait_idle(topo, timeout)
    except BaseException:
        down(topo.prefix)
        raise
    return conf


def _daemon_pids(state: Path) -> list[int]:
    pids = []
    for f in [state / "ctld" / "slurmctld.pid", *state.glob("nodes/*/slurmd.pid")]:
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(f.read_text().strip()))
    return pids


def down(prefix: str, grace: float = 2.0) -> list[str]:
    """Stop cluster ``prefix``: daemons (SIGTERM), then everything left in its hosts, its namespaces, munged if
    it started it, its state folder. Idempotent; returns the namespaces removed."""
    state = C.state_dir(prefix)
    pids = _daemon_pids(state)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    removed = hosts_down(prefix, grace=grace)
    if state.exists():
        others = [p for p in Path(C.STATE_ROOT).glob("datkit-slurm-*") if p != state and p.is_dir()]
        release_munged(state, others)
        shutil.rmtree(state, ignore_errors=True)
    return removed
