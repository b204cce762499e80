"""Emulated multi-node runs on one machine (``python -m datkit.netemu`` / ``launchers/emulated_hosts.py``).

This package is a developer tool, not library API: it runs datkit's multi-node launches on one machine, no
library module imports it (``tests/test_architecture.py`` checks this), and it ships inside the package only so
that ``python -m datkit.netemu`` runs from any install.

- :mod:`datkit.netemu.hosts`: network namespaces on a software switch, ``tc tbf``-limited links, teardown;
- :mod:`datkit.netemu.probe`: a TCP throughput probe between two emulated hosts;
- :mod:`datkit.netemu.launch`: each backend's own multi-node launch (torchrun rendezvous, horovodrun -H
  through an ssh shim, deepspeed --no_ssh per node) and Horovod's MPI launches (horovodrun --mpi, Open MPI's
  mpirun, both through the shim), started inside the hosts' namespaces;
- :mod:`datkit.netemu.cli`: ``up`` / ``down`` / ``run`` / ``probe``.
"""
from __future__ import annotations

from datkit.netemu.hosts import NEEDS, NetemuError, Topology, available, down, up

__all__ = ["NEEDS", "NetemuError", "Topology", "available", "down", "up"]
