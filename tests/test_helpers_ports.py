"""``tests/helpers/ports.py``: reserved ports are distinct, below the ephemeral range, free, and locked against
other processes (a second process never gets a port this one holds)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from helpers.ports import _ephemeral_low, reserve_port


def test_reserved_ports_are_distinct_free_and_outside_the_ephemeral_range() -> None:
    ports = [reserve_port() for _ in range(5)]
    assert len(set(ports)) == 5 and all(p < _ephemeral_low() for p in ports), ports
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # still free: reserving does not bind


def test_another_process_never_gets_a_port_held_here() -> None:
    held = {reserve_port() for _ in range(20)}
    helpers = Path(__file__).parent
    # the child starts its search where this process did (same pid): only the locks keep it off our ports
    code = f"import os, sys; sys.path.insert(0, {str(helpers)!r}); os.getpid = lambda: {os.getpid()}; " \
           "from helpers.ports import reserve_port; print(*[reserve_port() for _ in range(200)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    theirs = {int(p) for p in out.stdout.split()}
    assert len(theirs) == 200 and not theirs & held
