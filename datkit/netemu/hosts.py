"""Emulated hosts on one machine: network namespaces on a software switch, links limited with ``tc tbf``.

Layout for ``prefix`` ``dkt`` and N hosts (everything lives in namespaces this module creates; the root
namespace gets no address, route or interface, so traffic never leaves the machine):

- ``dktsw``: the switch, a namespace holding bridge ``br0`` and the switch ends ``dkt<i>p`` of the links;
- ``dkth<i>`` (i = 0..N-1): host i, holding ``lo`` (up) and its link end ``dkteth`` with address
  ``198.18.0.<i+1>/24`` (198.18.0.0/15 is reserved for network benchmarking, RFC 2544);
- each link is a veth pair with a ``tbf`` qdisc on BOTH ends (egress of the host and egress of the switch
  port), so each direction of each link is limited to ``rate``; host-to-host traffic crosses two links.

tbf settings (``tc-tbf(8)``): ``burst`` must hold at least ``rate / HZ`` bytes or the rate is not reached
(the kernel refills the bucket per timer tick); this kernel's HZ is not exposed, so the burst is sized for
HZ >= 100: ``max(rate / 100, 64 KiB)`` bytes, i.e. 10 ms of traffic (125 KB at 100 Mbit/s, 12.5 MB at
10 Gbit/s). A burst that size lets a message of up to 10 ms worth of bytes through at memory speed, which
makes links look up to ~10 ms faster per burst than the rate; the tbf ``latency`` (how long a packet may
wait in the queue before it is dropped, which sizes the queue) is 100 ms.

Names: ``ip netns exec`` bind-mounts ``/etc/netns/<ns>/hosts`` over ``/etc/hosts``; this module writes one
per host in which the machine's hostname (shared by every namespace) and ``<prefix>h<j>`` resolve to the
host's own / host j's address, as on a cluster node. Without it the hostname resolves to 127.0.0.1 inside
every host, and Horovod 0.28.1's process-set gloo context (which forgets ``HOROVOD_GLOO_IFACE`` and falls
back to the hostname) advertises 127.0.0.1 to the other hosts and fails with "connect [127.0.0.1]".
``netem`` (delay, loss) is not
available on these machines, so only bandwidth is emulated, not latency.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SUBNET = "198.18.0"
PREFIX_LEN = 24
MAX_HOSTS = 200
TBF_LATENCY = "100ms"
MIN_BURST = 64 * 1024
NETNS_ETC = "/etc/netns"  # ip netns exec bind-mounts /etc/netns/<ns>/* over /etc/*
HOSTS_MARK = "# created by datkit.netemu; removed by 'down'"
NEEDS = "needs root and iproute2 (ip, tc) for network namespaces"
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class NetemuError(RuntimeError):
    """A set-up step failed, or the machine cannot create emulated hosts (the message says why)."""


@dataclass(frozen=True)
class Topology:
    """N emulated hosts named from ``prefix``; ``rate`` as tc writes it (``100mbit``, ``1gbit``, ...)."""

    hosts: int
    rate: str = "1gbit"
    prefix: str = "dkt"

    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}sw"

    def host_ns(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    @property
    def iface(self) -> str:
        """Every host's end of its link: one name in every host namespace, as Horovod needs a common
        interface (``--network-interface``) and gloo one ``GLOO_SOCKET_IFNAME``."""
        return f"{self.prefix}eth"

    def port(self, i: int) -> str:
        """The switch's end of host i's link."""
        return f"{self.prefix}{i}p"

    @staticmethod
    def addr(i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def namespaces(self) -> list[str]:
        return [self.host_ns(i) for i in range(self.hosts)] + [self.switch_ns]


def rate_bits(rate: str) -> int:
    """Bits per second of a tc rate such as ``100mbit``, ``1gbit``, ``10Gbit`` or ``500kbit``."""
    r = rate.strip().lower()
    if not r.endswith("bit"):
        raise NetemuError(f"rate '{rate}': give bits per second as tc writes them, e.g. 100mbit, 1gbit, 10gbit")
    num, unit = r[:-3], ""
    if num and num[-1] in _UNITS:
        num, unit = num[:-1], num[-1]
    try:
        value = float(num) * _UNITS[unit]
    except ValueError:
        raise NetemuError(f"rate '{rate}': not a number of bits per second (e.g. 100mbit, 1gbit)") from None
    if value <= 0:
        raise NetemuError(f"rate '{rate}' must be positive")
    return int(value)


def burst_bytes(rate: str) -> int:
    """The tbf bucket: 10 ms of traffic at ``rate`` (enough for HZ >= 100), at least 64 KiB."""
    return max(rate_bits(rate) // 8 // 100, MIN_BURST)


def require_tools() -> None:
    """Raise :class:`NetemuError` unless this process is root and ``ip`` and ``tc`` exist and work."""
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        raise NetemuError(f"{NEEDS}: {', '.join(missing)} not found on PATH")
    if os.geteuid() != 0:
        raise NetemuError(f"{NEEDS}: run as root (uid is {os.geteuid()})")
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        raise NetemuError(f"{NEEDS}: 'ip netns list' fails here")


def unavailable(require: Callable[[], None]) -> str | None:
    """None when ``require()`` passes, else the message of the :class:`NetemuError` it raises (the reason)."""
    try:
        require()
    except NetemuError as e:
        return str(e)
    return None


def available() -> str | None:
    """None when emulated hosts can be created here, else the reason they cannot."""
    return unavailable(require_tools)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetemuError(f"'{' '.join(args)}' failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def existing_namespaces(prefix: str) -> list[str]:
    """Namespaces named like this tool's (``<prefix>h<i>``, ``<prefix>sw``) that exist now."""
    out = _ip("ip", "netns", "list").stdout.split("\n")
    names = [line.split()[0] for line in out if line.strip()]
    return [n for n in names if n == f"{prefix}sw" or (n.startswith(f"{prefix}h") and n[len(prefix) + 1:].isdigit())]


def up(topo: Topology) -> Topology:
    """Create the switch, the hosts and their links; check that every host reaches host 0. Returns ``topo``.

    Raises :class:`NetemuError` if a namespace of this prefix exists already (``down`` first) or a step
    fails (what was created is removed again).
    """
    require_tools()
    if not 1 <= topo.hosts <= MAX_HOSTS:
        raise NetemuError(f"--hosts {topo.hosts}: between 1 and {MAX_HOSTS}")
    if not topo.prefix.isalnum() or len(topo.prefix) > 8:
        raise NetemuError(f"--prefix '{topo.prefix}': letters and digits only, at most 8 (interface names are short)")
    rate_bits(topo.rate)
    left = existing_namespaces(topo.prefix)
    if left:
        raise NetemuError(f"namespaces {', '.join(left)} exist already: run 'down --prefix {topo.prefix}' first")
    burst = str(burst_bytes(topo.rate))
    try:
        sw = topo.switch_ns
        _ip("ip", "netns", "add", sw)
        _ip("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("ip", "-n", sw, "link", "set", "br0", "up")
        for i in range(topo.hosts):
            ns, e, p = topo.host_ns(i), topo.iface, topo.port(i)
            _ip("ip", "netns", "add", ns)
            write_hosts_file(topo, i)
            _ip("ip", "-n", ns, "link", "set", "lo", "up")
            # Created inside the switch namespace, then one end moved: never an interface in the root namespace.
            _ip("ip", "-n", sw, "link", "add", p, "type", "veth", "peer", "name", e, "netns", ns)
            _ip("ip", "-n", sw, "link", "set", p, "master", "br0")
            _ip("ip", "-n", sw, "link", "set", p, "up")
            _ip("ip", "-n", ns, "addr", "add", f"{topo.addr(i)}/{PREFIX_LEN}", "dev", e)
            _ip("ip", "-n", ns, "link", "set", e, "up")
            for where, dev in ((ns, e), (sw, p)):
                _ip("tc", "-n", where, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", topo.rate,
                    "burst", burst, "latency", TBF_LATENCY)
        check_reachable(topo)
    except BaseException:
        down(topo.prefix)
        raise
    return topo


def ns_pids(ns: str) -> list[int]:
    """Processes running in namespace ``ns``."""
    proc = _ip("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split() if p.strip().isdigit()]


def down(prefix: str = "dkt", grace: float = 5.0) -> list[str]:
    """Kill the processes left in this prefix's namespaces (SIGTERM, then SIGKILL after ``grace`` s) and
    delete the namespaces (their veths and bridge go with them). Idempotent; returns the names removed."""
    names = existing_namespaces(prefix)
    pids = [p for ns in names for p in ns_pids(ns) if p != os.getpid()]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        alive = []
        for p in pids:
            try:
                os.kill(p, sig)
                alive.append(p)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if _alive(p)]
            time.sleep(0.05)
        pids = alive
    for ns in names:
        _ip("ip", "netns", "del", ns, check=False)
    for folder in Path(NETNS_ETC).glob(f"{prefix}h*"):
        hosts = folder / "hosts"
        if folder.name[len(prefix) + 1:].isdigit() and hosts.exists() and hosts.read_text().startswith(HOSTS_MARK):
            shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):  # only when empty
        Path(NETNS_ETC).rmdir()
    return names


def write_hosts_file(topo: Topology, i: int) -> Path:
    """``/etc/netns/<host i>/hosts``: localhost, every host's name, this machine's hostname as host i's address."""
    folder = Path(NETNS_ETC) / topo.host_ns(i)
    folder.mkdir(parents=True, exist_ok=True)
    # a host's own line: its name first (the canonical name, which socket.getfqdn() returns and torchrun
    # advertises to the other hosts), the machine's hostname as an alias
    lines = [HOSTS_MARK, "127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
    lines += [f"{topo.addr(j)} {topo.host_ns(j)}" + (f" {socket.gethostname()}" if j == i else "")
              for j in range(topo.hosts)]
    path = folder / "hosts"
    path.write_text("\n".join(lines) + "\n")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def ns_exec(ns: str) -> list[str]:
    """The argv prefix that runs a command inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns]


def check_reachable(topo: Topology, timeout: float = 10.0) -> None:
    """Every host opens a TCP connection to a listener in host 0 (retried until ``timeout``)."""
    if topo.hosts < 2:
        return
    code = ("import socket,sys,time\n"
            "d=time.monotonic()+float(sys.argv[2])\n"
            "while True:\n"
            "  try: socket.create_connection((sys.argv[1],int(sys.argv[3])),timeout=2).close(); break\n"
            "  except OSError:\n"
            "    if time.monotonic()>d: sys.exit('unreachable: '+sys.argv[1])\n"
            "    time.sleep(0.1)\n")
    server = ("import socket,sys\n"
              "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); "
              "s.bind(('0.0.0.0',0)); s.listen(64)\n"
              "print(s.getsockname()[1],flush=True); n=int(sys.argv[1]); s.settimeout(float(sys.argv[2]))\n"
              "for _ in range(n): s.accept()[0].close()\n")
    srv = subprocess.Popen([*ns_exec(topo.host_ns(0)), sys.executable, "-c", server, str(topo.hosts - 1), str(timeout)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = srv.stdout.readline().strip()
        if not port:
            raise NetemuError(f"reachability check: listener in {topo.host_ns(0)} did not start: {srv.stderr.read()}")
        clients = [subprocess.Popen([*ns_exec(topo.host_ns(i)), sys.executable, "-c", code, topo.addr(0),
                                     str(timeout), port],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for i in range(1, topo.hosts)]
        bad = [(i + 1, c.communicate()[1].strip()) for i, c in enumerate(clients) if c.wait() != 0]
        if bad:
            raise NetemuError("reachability check failed: " + "; ".join(f"{topo.host_ns(i)}: {m}" for i, m in bad))
        srv.wait(timeout=timeout)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
