"""Measure an emulated link: a TCP transfer of ``nbytes`` from one host namespace to another.

The receiver (in host ``dst``) counts bytes from the first to the last one received, so connection set-up
is not timed; throughput = 8 * (bytes - first chunk) / (t_last - t_first) bits per second. Host-to-host
traffic crosses two tbf-limited links (host -> switch, switch -> host), so it is bounded by ``rate``.
"""
from __future__ import annotations

import subprocess
import sys

from datkit.netemu.hosts import NetemuError, Topology, ns_exec

_RECV = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
s.settimeout(float(sys.argv[2])); c, _ = s.accept(); c.settimeout(float(sys.argv[2]))
n, first, t0 = int(sys.argv[1]), 0, None
got = 0
while got < n:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0, first = time.perf_counter(), len(b)
    got += len(b)
t1 = time.perf_counter()
print(got, first, t1 - t0, flush=True)
"""
_SEND = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
buf = b'x' * (1 << 20); left = int(sys.argv[3])
while left > 0:
    k = c.send(buf[:min(left, len(buf))]); left -= k
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""


def measure_throughput(topo: Topology, src: int = 1, dst: int = 0, nbytes: int = 5_000_000,
                       timeout: float = 60.0) -> float:
    """Bits per second of one TCP stream from host ``src`` to host ``dst`` (``nbytes`` payload)."""
    recv = subprocess.Popen([*ns_exec(topo.host_ns(dst)), sys.executable, "-c", _RECV, str(nbytes), str(timeout)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = recv.stdout.readline().strip()
        if not port:
            raise NetemuError(f"throughput probe: receiver did not start: {recv.stderr.read()}")
        send = subprocess.run([*ns_exec(topo.host_ns(src)), sys.executable, "-c", _SEND, topo.addr(dst), port,
                               str(nbytes)],
                              capture_output=True, text=True, timeout=timeout)
        out, err = recv.communicate(timeout=timeout)
        if send.returncode != 0 or recv.returncode != 0:
            raise NetemuError(f"throughput probe failed: {send.stderr.strip()} {err.strip()}")
        got, first, secs = out.split()
        return 8 * (int(got) - int(first)) / float(secs)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
