"""``python -m datkit.netemu`` / ``launchers/emulated_hosts.py``: emulated hosts on one machine.

Subcommands:

- ``up --hosts N --rate 100mbit [--prefix dkt] [--probe]``: create N hosts on a switch (see
  :mod:`datkit.netemu.hosts`); ``--probe`` measures host 1 -> host 0 throughput afterwards;
- ``down [--prefix dkt]``: remove them (and kill what still runs inside them); idempotent;
- ``run --hosts N --rate R --backend torch|horovod|deepspeed [--launcher L] [--workers-per-host K] -- key=value ...``:
  up, the backend's own multi-node launch of ``datkit.train`` with those overrides (or another launcher of that
  backend: ``--launcher horovodrun-mpi`` or ``mpirun`` for horovod, Open MPI underneath), wait, down (also on
  Ctrl-C / SIGTERM / errors); exits with the job's exit code;
- ``probe --prefix dkt [--bytes B]``: throughput between host 1 and host 0 of existing hosts;
- ``slurm up|down|exec|env``: a Slurm cluster on emulated hosts (see :mod:`datkit.netemu.slurm_cli`).

Needs root and iproute2 (``ip``, ``tc``); without them every subcommand exits 2 saying so.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from datkit.netemu import slurm_cli
from datkit.netemu.hosts import NetemuError, Topology, down, existing_namespaces, require_tools, up
from datkit.netemu.launch import DEFAULT_PORT, LAUNCHERS, LAUNCHES
from datkit.netemu.probe import measure_throughput
from datkit.netemu.runner import Interrupted, run_job

PROG = "python -m datkit.netemu"


def _common(p: argparse.ArgumentParser, hosts: bool = True) -> None:
    if hosts:
        p.add_argument("--hosts", type=int, required=True, help="number of emulated hosts (namespaces)")
        p.add_argument("--rate", default="1gbit",
                       help="link rate as tc writes it: 100mbit, 1gbit, 10gbit (default 1gbit)")
    p.add_argument("--prefix", default="dkt",
                   help="name prefix of the namespaces: <prefix>h0.., <prefix>sw (default dkt)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Emulated hosts (network namespaces joined by tc-limited "
                                "links) and multi-node datkit runs across them. Needs root and iproute2.")
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="create the hosts and the switch")
    _common(u)
    u.add_argument("--probe", action="store_true", help="measure host1 -> host0 throughput afterwards (5 MB)")
    _common(sub.add_parser("down", help="remove the hosts (idempotent)"), hosts=False)
    pr = sub.add_parser("probe", help="TCP throughput host1 -> host0 of existing hosts")
    _common(pr, hosts=False)
    pr.add_argument("--bytes", type=int, default=5_000_000, help="bytes to send (default 5,000,000)")
    r = sub.add_parser("run", help="up, run a datkit job across the hosts with the backend's own launcher, down")
    _common(r)
    r.add_argument("--backend", required=True, choices=list(LAUNCHES), help="whose multi-node launch to use")
    own = "; ".join(f"{b}: {', '.join(names)}" for b, names in LAUNCHES.items())
    r.add_argument("--launcher", choices=LAUNCHERS, default=None,
                   help=f"which of the backend's launchers (default: its own, the first) -- {own}")
    r.add_argument("--workers-per-host", type=int, default=1, help="worker processes per host (default 1)")
    r.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"rendezvous / master port on host 0 (default {DEFAULT_PORT})")
    r.add_argument("--grace", type=float, default=60.0,
                   help="after one host fails, seconds the others get to exit (default 60)")
    r.add_argument("--timeout", type=float, default=None, help="stop the job after this many seconds (exit 124)")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="datkit.train overrides (after --)")
    slurm_cli.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for usage errors and machines that cannot emulate hosts)."""
    args = parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        if args.cmd == "slurm":
            return slurm_cli.run(args)
        require_tools()
        if args.cmd == "down":
            removed = down(args.prefix)
            print(f"removed {', '.join(removed)}" if removed else f"nothing to remove (no '{args.prefix}' namespaces)")
            return 0
        if args.cmd == "probe":
            n = sum(1 for ns in existing_namespaces(args.prefix) if ns != f"{args.prefix}sw")
            if n < 2:
                raise NetemuError(f"probe needs 2 or more '{args.prefix}' hosts ('up' first); found {n}")
            bps = measure_throughput(Topology(n, prefix=args.prefix), nbytes=args.bytes)
            print(f"{args.prefix}h1 -> {args.prefix}h0: {bps / 1e6:.1f} Mbit/s ({args.bytes:,} bytes)")
            return 0
        topo = Topology(args.hosts, args.rate, args.prefix)
        if args.cmd == "up":
            up(topo)
            print(f"up: {', '.join(topo.namespaces())}; hosts {topo.addr(0)}..{topo.addr(topo.hosts - 1)} "
                  f"on {topo.iface}, links {topo.rate} each way; "
                  f"run commands with 'ip netns exec {topo.host_ns(0)} ...'")
            if args.probe and topo.hosts > 1:
                print(f"probe {topo.host_ns(1)} -> {topo.host_ns(0)}: {measure_throughput(topo) / 1e6:.1f} Mbit/s")
            return 0
        if args.workers_per_host < 1:
            raise NetemuError(f"--workers-per-host {args.workers_per_host}: must be >= 1")
        if args.launcher is not None and args.launcher not in LAUNCHES[args.backend]:
            raise NetemuError(f"--launcher {args.launcher} does not launch --backend {args.backend} (its launchers: "
                              f"{', '.join(LAUNCHES[args.backend])})")
        rc = run_job(topo, args.backend, args.overrides, args.workers_per_host, port=args.port, grace=args.grace,
                     timeout=args.timeout, launcher=args.launcher)
        via = f" via {args.launcher}" if args.launcher else ""
        print(f"netemu run: {args.backend}{via} on {topo.hosts} hosts x {args.workers_per_host} at {topo.rate}: "
              f"exit {rc}; namespaces removed", file=sys.stderr)
        return rc
    except NetemuError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"{PROG}: {e}; hosts torn down", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
