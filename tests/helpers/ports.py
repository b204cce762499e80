"""A TCP port for a launcher that must be told one up front (DeepSpeed's ``--master_port``), without races.

Binding port 0 and releasing it ("bind, release and hope") races twice: the kernel hands the same
ephemeral port to any later ``connect`` (gloo opens many) or ``bind(0)`` of another process before the
launcher binds it. ``reserve_port`` instead picks a port *below* the kernel's ephemeral range (so no
automatic assignment can take it), checks that it is free, and holds an ``flock`` on
``$TMPDIR/datkit-test-ports/<port>.lock`` until this test process exits, so that concurrent test runs
(two pytest sessions, xdist workers) never pick the same one.
"""
from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path
from typing import IO

_HELD: list[IO[bytes]] = []  # lock files kept open (and locked) for this process's lifetime
_LOCKS = Path(tempfile.gettempdir()) / "datkit-test-ports"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def reserve_port(low: int = 20000) -> int:
    """A free port in [low, ephemeral range start), reserved for this process (see the module docstring)."""
    high = _ephemeral_low()
    if high - low < 100:
        low = 10000
    _LOCKS.mkdir(parents=True, exist_ok=True)
    span = high - low
    start = (os.getpid() * 7919) % span  # different processes start at different places
    for i in range(span):
        port = low + (start + i) % span
        f = open(_LOCKS / f"{port}.lock", "ab")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        if _bindable(port):
            _HELD.append(f)
            return port
        f.close()
    raise RuntimeError(f"no free port in [{low}, {high})")
