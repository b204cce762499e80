"""Each backend's OWN multi-node launch, as the per-host commands to start inside the emulated hosts.

A launch is a list of :class:`HostCommand` (host index, argv, extra environment); the runner starts each
with ``ip netns exec <host namespace> argv``. Host 0 (``198.18.0.1``) is the master / rendezvous host.
:data:`LAUNCHES` maps each backend to its launchers by name, its own first (the default of ``run
--backend B``; ``--launcher`` picks another): torch: torchrun; horovod: horovodrun (gloo), horovodrun-mpi,
mpirun; deepspeed: deepspeed. The launch differs, the job (``datkit.train backend=B``) does not.

- ``torch``: on every host ``torchrun --nnodes N --nproc_per_node K --node_rank i --rdzv_backend c10d
  --rdzv_endpoint 198.18.0.1:P --rdzv_conf is_host=<i == 0> --local-addr <host address> -m datkit.train
  backend=torch ...`` (c10d rendezvous: host 0's agent serves the store). Both ``is_host`` and
  ``--local-addr`` are needed because every namespace shares the machine's hostname, which resolves to an
  address outside the emulated network: torchrun would neither recognise host 0 as the endpoint's host
  (every agent then waits for a store nobody serves) nor advertise a reachable address.
- ``horovod``: on host 0 only, ``horovodrun -np N*K -H 198.18.0.1:K,198.18.0.2:K,... --gloo
  --network-interface <iface> python -m datkit.train backend=horovod ...``. horovodrun reaches the other
  hosts with ``ssh``; a generated ``ssh`` shim first on PATH maps the address to its host namespace and
  runs the command there with ``ip netns exec`` (no ssh server needed, and the traffic still crosses the
  emulated links). Every host's interface has the same name, so ``--network-interface`` names a common
  interface and horovodrun skips its interface discovery.
- ``horovod`` with ``--launcher horovodrun-mpi``: the same, with ``--mpi`` instead of ``--gloo``: horovodrun
  runs Open MPI's ``mpirun`` (it adds ``--allow-run-as-root``, ``-mca btl_tcp_if_include <iface>`` and
  ``-x`` for its whole environment), which starts its ``orted`` daemons through the same ssh shim (found
  on PATH; horovodrun also adds ``--bind-to none``); ``--mpi-args`` adds ``--mca oob_tcp_if_include <iface>``
  (mpirun <-> orted). Horovod's controller and CPU collectives are then MPI.
- ``horovod`` with ``--launcher mpirun``: Open MPI's ``mpirun --allow-run-as-root -np N*K -H
  198.18.0.1:K,... --bind-to none --mca plm_rsh_agent <shim> --mca btl_tcp_if_include <iface> --mca
  oob_tcp_if_include <iface> -x PATH -x PYTHONPATH ... python -m datkit.train backend=horovod ...`` on
  host 0, no horovodrun at all (Horovod's MPI build reads its ranks from Open MPI); ``--bind-to none``: every
  host's ranks share this machine's cores, and Open MPI would pin each host's first rank to the same core.
- ``deepspeed``: on every host ``deepspeed --hostfile H --no_ssh --node_rank i --num_nodes N --num_gpus K
  --master_addr 198.18.0.1 --master_port P datkit/train.py backend=deepspeed ...`` (DeepSpeed 0.19.8 needs
  the hostfile even with ``--no_ssh``: without one it sets ``master_addr`` to 127.0.0.1 and refuses
  ``--num_nodes`` > 1). On CPU DeepSpeed uses gloo.

Every host gets ``GLOO_SOCKET_IFNAME=<iface>`` (gloo, torch and DeepSpeed), and
``OMP_NUM_THREADS = max(1, cores // (N*K))`` unless the caller's environment sets it: all emulated hosts
share this machine's cores.
"""
from __future__ import annotations

import os
import shlex
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datkit
from datkit.netemu.hosts import Topology

# Launcher variables of an enclosing launch that must not leak into the emulated hosts' jobs.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE")
DEFAULT_PORT = 29500


@dataclass
class HostCommand:
    """``argv`` to run in host ``host``'s namespace with ``env`` added to the base environment."""

    host: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class LaunchSpec:
    """What every backend's launch needs: hosts, workers per host, datkit overrides, a scratch folder."""

    topo: Topology
    workers_per_host: int
    overrides: list[str]
    workdir: Path
    port: int = DEFAULT_PORT

    @property
    def world_size(self) -> int:
        return self.topo.hosts * self.workers_per_host


def base_env(spec: LaunchSpec) -> dict[str, str]:
    """The environment of every host's launcher: the caller's, minus enclosing launchers' variables, plus
    ``GLOO_SOCKET_IFNAME`` and (unless set) ``OMP_NUM_THREADS`` = cores / all workers."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(("TORCHELASTIC_", "HOROVOD_", "OMPI_", "PMI_"))}
    env["GLOO_SOCKET_IFNAME"] = spec.topo.iface
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.world_size)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _bin(name: str) -> str:
    """A console script installed next to this Python (the venv's), else the name (looked up on PATH)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


def torch_launch(spec: LaunchSpec) -> list[HostCommand]:
    """torchrun on every host, c10d rendezvous at host 0."""
    t = spec.topo
    return [HostCommand(i, [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(t.hosts),
                            "--nproc_per_node", str(spec.workers_per_host), "--node_rank", str(i),
                            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{t.addr(0)}:{spec.port}",
                            "--rdzv_id", f"datkit-{t.prefix}", "--rdzv_conf", f"is_host={int(i == 0)}",
                            "--local-addr", t.addr(i), "--max-restarts", "0",
                            "-m", "datkit.train", "backend=torch", *spec.overrides])
            for i in range(t.hosts)]


def write_ssh_shim(topo: Topology, folder: Path, hostname: bool = False) -> Path:
    """Write ``folder/ssh``: ``ssh [options] HOST COMMAND...`` runs COMMAND with ``/bin/sh -c`` inside the
    namespace of the emulated host HOST names (its address or its name ``<prefix>h<i>``, as Slurm's node
    names), as sshd would run it through the login shell. ``hostname``: also in a UTS namespace of its own
    whose hostname is the host's name (as on the Slurm nodes of :mod:`datkit.netemu.slurm`)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = "\n".join(f"  {topo.addr(i)}|{topo.host_ns(i)}) ns={topo.host_ns(i)} ;;" for i in range(topo.hosts))
    run = ('exec ip netns exec "$ns" unshare --uts /bin/sh -c \'hostname "$0" && exec /bin/sh -c "$1"\' "$ns" "$*"'
           if hostname else 'exec ip netns exec "$ns" /bin/sh -c "$*"')
    script = f"""#!/bin/bash
# Generated by datkit.netemu: "ssh" to an emulated host = run the command in that host's network namespace.
host=""
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-p|-i|-l|-F|-E|-J) shift 2 ;;
    -*) shift ;;
    *) if [ -z "$host" ]; then host="$1"; shift; else break; fi ;;
  esac
done
case "${{host#*@}}" in
{cases}
  *) echo "datkit.netemu ssh shim: '$host' is not an emulated host" >&2; exit 255 ;;
esac
{run}
"""
    path = folder / "ssh"
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _horovodrun(spec: LaunchSpec, controller: list[str]) -> list[HostCommand]:
    """horovodrun on host 0 with ``-H`` listing every host and the ``controller`` options; ssh through the shim."""
    t, k = spec.topo, spec.workers_per_host
    shim = write_ssh_shim(t, spec.workdir / "bin")
    hosts = ",".join(f"{t.addr(i)}:{k}" for i in range(t.hosts))
    argv = [_bin("horovodrun"), "-np", str(spec.world_size), "-H", hosts, *controller, "--network-interface", t.iface,
            "--disable-cache", "--start-timeout", "120",
            sys.executable, "-m", "datkit.train", "backend=horovod", *spec.overrides]
    return [HostCommand(0, argv, {"PATH": f"{shim.parent}{os.pathsep}{os.environ.get('PATH', '')}"})]


def horovod_launch(spec: LaunchSpec) -> list[HostCommand]:
    """horovodrun --gloo on host 0 with ``-H`` listing every host; ssh through the namespace shim."""
    return _horovodrun(spec, ["--gloo"])


def _mpi_iface_args(iface: str) -> list[str]:
    """Open MPI on the emulated network only: its TCP transport (the ranks' messages) and its out-of-band channel
    (mpirun <-> orted) on ``iface``; ob1 over TCP (and shared memory between ranks of one host)."""
    return ["--mca", "btl_tcp_if_include", iface, "--mca", "oob_tcp_if_include", iface,
            "--mca", "pml", "ob1", "--mca", "btl", "self,vader,tcp"]


def horovod_mpi_launch(spec: LaunchSpec) -> list[HostCommand]:
    """horovodrun --mpi on host 0: Open MPI's mpirun underneath, its orteds started through the ssh shim."""
    return _horovodrun(spec, ["--mpi", "--mpi-args", f"--mca oob_tcp_if_include {spec.topo.iface}"])


# The environment mpirun forwards to every rank (-x): what the job needs of the caller's, and base_env's additions.
MPI_FORWARD = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "OMP_NUM_THREADS", "PYTHONUNBUFFERED",
               "GLOO_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES")


def mpirun_launch(spec: LaunchSpec) -> list[HostCommand]:
    """Open MPI's mpirun on host 0 with ``-H`` listing every host; orteds through the ssh shim (plm_rsh_agent)."""
    t, k = spec.topo, spec.workers_per_host
    shim = write_ssh_shim(t, spec.workdir / "bin")
    hosts = ",".join(f"{t.addr(i)}:{k}" for i in range(t.hosts))
    env = base_env(spec)
    forward = [a for v in MPI_FORWARD if v in env for a in ("-x", v)]
    argv = ["mpirun", "--allow-run-as-root", "-np", str(spec.world_size), "-H", hosts, "--bind-to", "none",
            "--mca", "plm_rsh_agent", str(shim), *_mpi_iface_args(t.iface), *forward,
            sys.executable, "-m", "datkit.train", "backend=horovod", *spec.overrides]
    return [HostCommand(0, argv)]


def write_hostfile(spec: LaunchSpec) -> Path:
    """DeepSpeed's hostfile: ``<address> slots=K`` per host."""
    spec.workdir.mkdir(parents=True, exist_ok=True)
    path = spec.workdir / "hostfile"
    path.write_text("".join(f"{spec.topo.addr(i)} slots={spec.workers_per_host}\n" for i in range(spec.topo.hosts)))
    return path


def deepspeed_launch(spec: LaunchSpec) -> list[HostCommand]:
    """The deepspeed launcher on every host, ``--no_ssh --node_rank i`` (each starts its own workers)."""
    t = spec.topo
    hostfile = write_hostfile(spec)
    script = str(Path(datkit.__file__).resolve().parent / "train.py")
    return [HostCommand(i, [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                            "--node_rank", str(i), "--num_nodes", str(t.hosts),
                            "--num_gpus", str(spec.workers_per_host),
                            "--master_addr", t.addr(0), "--master_port", str(spec.port),
                            script, "backend=deepspeed", *spec.overrides])
            for i in range(t.hosts)]


Launch = Callable[[LaunchSpec], list[HostCommand]]
# backend -> {launcher name: its per-host commands}; the backend's own launcher first (the default).
LAUNCHES: dict[str, dict[str, Launch]] = {
    "torch": {"torchrun": torch_launch},
    "horovod": {"horovodrun": horovod_launch, "horovodrun-mpi": horovod_mpi_launch, "mpirun": mpirun_launch},
    "deepspeed": {"deepspeed": deepspeed_launch},
}
LAUNCHERS: list[str] = list(dict.fromkeys(name for launches in LAUNCHES.values() for name in launches))


def host_commands(backend: str, spec: LaunchSpec, launcher: str | None = None) -> list[HostCommand]:
    """The commands of ``backend``'s multi-node launch by ``launcher`` (default: the backend's own; see
    :data:`LAUNCHES`)."""
    try:
        launches = LAUNCHES[backend]
    except KeyError:
        raise ValueError(f"--backend '{backend}': choose one of {', '.join(LAUNCHES)}") from None
    name = launcher or next(iter(launches))
    if name not in launches:
        raise ValueError(f"--launcher '{name}' does not launch backend={backend}: its launchers are "
                         f"{', '.join(launches)}")
    return launches[name](spec)


def render(cmds: Sequence[HostCommand], topo: Topology) -> str:
    """The commands as a shell would run them (for logs and ``--dry-run``)."""
    lines = []
    for c in cmds:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in c.env.items() if k != "PATH")
        lines.append(f"[{topo.host_ns(c.host)}] ip netns exec {topo.host_ns(c.host)} "
                     + (env + " " if env else "") + shlex.join(c.argv))
    return "\n".join(lines)
