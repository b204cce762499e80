"""``python -m datkit.netemu slurm up|down|exec|env``: the command line of :mod:`datkit.netemu.slurm`.

- ``slurm up --hosts N [--prefix dks] [--rate 1gbit] [--cpus 8] [--gpus 8] [--timeout 60]``: hosts, munge,
  slurmctld, slurmds; returns when every node is idle and prints how to submit;
- ``slurm down [--prefix dks]``: everything of that cluster gone (idempotent);
- ``slurm exec [--prefix dks] -- CMD ...``: CMD as a client of the cluster (host 0's namespace,
  ``SLURM_CONF``, the ssh shim on PATH); exits with CMD's exit code;
- ``slurm env [--prefix dks]``: the same as shell lines to paste (``export ...`` and the ``ip netns exec`` prefix).
"""
from __future__ import annotations

import argparse
import subprocess

from datkit.netemu import slurm as S
from datkit.netemu.hosts import NetemuError, Topology
from datkit.netemu.slurm_conf import conf_path, node_names, state_dir

DEFAULT_PREFIX = "dks"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``slurm`` subcommand and its actions."""
    p = sub.add_parser("slurm", help="a Slurm cluster on emulated hosts: up, down, exec (a client command), env")
    acts = p.add_subparsers(dest="action", required=True)
    u = acts.add_parser("up", help="create the hosts and start munge, slurmctld and one slurmd per host")
    u.add_argument("--hosts", type=int, required=True, help="number of nodes (emulated hosts)")
    u.add_argument("--rate", default="1gbit", help="link rate as tc writes it (default 1gbit)")
    u.add_argument("--cpus", type=int, default=8,
                   help="CPUs each node declares (default 8; more than the machine has is fine)")
    u.add_argument("--gpus", type=int, default=8,
                   help="GPUs each node declares for --gpus-per-node (stand-ins; default 8)")
    u.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for every node to be idle (default 60)")
    acts.add_parser("down", help="stop the cluster, remove its hosts and files (idempotent)")
    e = acts.add_parser("exec", help="run a client command (sbatch, squeue, ...) against the cluster")
    e.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    acts.add_parser("env", help="print the shell lines that make this shell a client of the cluster")
    for a in acts.choices.values():
        a.add_argument("--prefix", default=DEFAULT_PREFIX,
                       help=f"name prefix of the hosts/nodes (default {DEFAULT_PREFIX})")


def usage(prefix: str) -> str:
    """How a shell submits to cluster ``prefix``."""
    return (f"export SLURM_CONF={conf_path(prefix)} PATH={state_dir(prefix) / 'bin'}:$PATH\n"
            f"ip netns exec {prefix}h0 sbatch ...   "
            f"# or: python -m datkit.netemu slurm exec --prefix {prefix} -- sbatch ...")


def run(args: argparse.Namespace) -> int:
    """Carry out ``args.action``; returns the exit code (NetemuError propagates to the CLI)."""
    if args.action == "down":
        S.require_tools()
        removed = S.down(args.prefix)
        print(f"slurm down: removed {', '.join(removed)}" if removed
              else f"slurm down: nothing left of '{args.prefix}'")
        return 0
    if args.action == "env":
        print(usage(args.prefix))
        return 0
    S.require_slurm()
    if args.action == "up":
        topo = Topology(args.hosts, args.rate, args.prefix)
        conf = S.up(topo, cpus=args.cpus, gpus=args.gpus, timeout=args.timeout)
        print(f"slurm up: nodes {node_names(topo)} idle ({args.cpus} CPUs, {args.gpus} GPUs each; "
              f"slurmctld on {topo.host_ns(0)} {topo.addr(0)}); conf {conf}\n{usage(args.prefix)}")
        return 0
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        raise NetemuError("slurm exec: give the command after --, e.g. 'slurm exec -- squeue'")
    if not conf_path(args.prefix).exists():
        raise NetemuError(f"no cluster '{args.prefix}': run 'slurm up --hosts N --prefix {args.prefix}' first")
    return subprocess.run(S.client_argv(args.prefix, cmd), env=S.client_env(args.prefix)).returncode
