"""Lost-worker detection: heart-beats in a TCPStore, a rank -> host table, and one clear message.

When a worker dies, the others see only what the transport says -- gloo's "Read error
[127.0.0.1]:7382: Connection reset by peer" names an address and port, not a rank -- or, when the
peer froze or its link went silent, nothing at all until ``dist.timeout_s`` (600 s) expires. The
launchers then SIGTERM the survivors (torchrun's agent, horovodrun, the deepspeed launcher), which
kills them without a word about who was lost.

``PeerWatch`` runs one daemon thread per worker. At start-up every rank publishes
``{host, address, pid, machine}`` under ``datkit/peer/<rank>`` in a TCPStore (the launcher's or rank
0's store, see ``Backend.peer_store_address``); then every ``interval_s`` it increments its own
heart-beat counter and reads everyone else's. A peer is *lost* when

- its process is gone (same machine, by ``/proc/<pid>``; instant), or
- its counter has not moved for ``peer_timeout_s`` (``dist.peer_timeout_s``; any machine), or, once a
  failure is known (a collective raised, the launcher sent SIGTERM), for ``3 * interval_s``;
- the store itself is unreachable: the rank that hosts it (or the launcher's agent) is gone.

Then the worker prints ``datkit: lost worker rank R (host H, pid P): <why>; this worker (rank r)
stops with exit code 3`` to stderr and exits with code ``LOST_WORKER_EXIT`` = 3 (``os._exit``: a
process group whose peer is gone can hang in its own tear-down).
"""
from __future__ import annotations

import atexit
import datetime
import itertools
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

LOST_WORKER_EXIT = 3
_GENERATION = itertools.count()  # watches started in this process (every rank starts them in the same order)
_ACTIVE: list[PeerWatch] = []


def next_generation() -> int:
    """A number for the next watch of this process: its keys stay apart from an earlier watch's (a process
    may build several backends one after the other, e.g. ``datkit.bench zero``)."""
    return next(_GENERATION)


@atexit.register
def _stop_all() -> None:
    """A normal interpreter exit is a clean finish: stop the threads before the store clients go away."""
    for watch in list(_ACTIVE):
        watch.stop()


def _machine_id() -> str:
    """Identifies this machine (processes in network namespaces of one machine share it: pids are comparable)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def _local_address(peer_host: str, peer_port: int) -> str:
    """The address this host uses to reach ``peer_host`` (its interface on that route)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer_host, peer_port))
            return s.getsockname()[0]
    except OSError:
        return "?"


def store_client(host: str, port: int, prefix: str, timeout_s: float) -> Any:
    """A new client of the TCPStore at ``host:port``, its keys under ``prefix/``."""
    import torch.distributed as dist

    store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    return dist.PrefixStore(prefix, store)


def process_gone(pid: int) -> bool:
    """True when ``pid`` does not exist on this machine or is a zombie (killed, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


class PeerWatch:
    """Heart-beat thread and lost-peer diagnosis of one worker (see module docstring).

    ``connect()`` returns a new client of the store (one for the thread, one for the caller's thread:
    a store client is not shared between threads); ``store_host_rank`` is the rank whose process hosts
    the store (None: the launcher's agent hosts it).
    """

    def __init__(self, connect: Callable[[], Any], address: tuple[str, int], rank: int, world_size: int,
                 peer_timeout_s: float, startup_timeout_s: float, store_host_rank: int | None,
                 log: Callable[[str], None] | None = None) -> None:
        self.connect, self.address, self.rank, self.world_size = connect, address, rank, world_size
        self.store_host_rank = store_host_rank
        self.peer_timeout_s = float(peer_timeout_s)
        self.interval_s = min(1.0, self.peer_timeout_s / 5)
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.store = connect()
        self.me = {"host": socket.gethostname(), "address": _local_address(*address), "pid": os.getpid(),
                   "machine": _machine_id()}
        self.store.add(f"hb/{rank}", 0)  # exists before the peers look for it (registered before peer/<rank>)
        self.store.set(f"peer/{rank}", json.dumps(self.me))
        others = [r for r in range(world_size) if r != rank]
        self.store.wait([f"peer/{r}" for r in others], datetime.timedelta(seconds=startup_timeout_s))
        self.peers = {r: json.loads(self.store.get(f"peer/{r}")) for r in others}
        now = time.monotonic()
        self._seen = dict.fromkeys(others, (-1, now))  # rank -> (last counter, monotonic time it changed)
        self._done: set[int] = set()  # peers that finished cleanly (key done/<rank>)
        self._store_error: tuple[str, float] | None = None  # (message, since)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reported = False
        self._exiting = False  # expect_exit(): every worker is stopping, nothing is reported any more
        self._thread = threading.Thread(target=self._run, args=(connect(),), name="datkit-peer-watch", daemon=True)
        self._thread.start()
        _ACTIVE.append(self)

    # --- description ---------------------------------------------------------------------------
    def host_of(self, rank: int) -> str:
        """``host NAME (ADDRESS), pid P`` of a worker as it registered at start-up."""
        p = self.peers.get(rank, self.me)
        return f"host {p['host']} ({p['address']}), pid {p['pid']}"

    # --- the thread ----------------------------------------------------------------------------
    def _run(self, store: Any) -> None:
        ranks = list(self._seen)
        while not self._stop.wait(self.interval_s):
            if self._store_error is not None:  # the store is gone for good: no more calls (each one logs a trace)
                store = None
            if store is None:
                lost = self.lost_peers(self.peer_timeout_s)
                if lost:
                    self.report(lost, None)
                continue
            try:
                store.add(f"hb/{self.rank}", 1)
                hb = [f"hb/{r}" for r in ranks]
                values = store.multi_get(hb) if store.check(hb) else None
                done = {r for r in ranks if store.check([f"done/{r}"])}
            except Exception as err:  # noqa: BLE001 -- the store's host is gone (or unreachable)
                with self._lock:
                    if self._store_error is None:
                        self._store_error = (f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}",
                                             time.monotonic())
            else:
                now = time.monotonic()
                with self._lock:
                    self._store_error = None
                    self._done |= done
                    for i, r in enumerate(ranks):
                        count = int(values[i]) if values is not None else -1
                        if count != self._seen[r][0]:
                            self._seen[r] = (count, now)
            lost = self.lost_peers(self.peer_timeout_s)
            try:  # a peer that finished cleanly after this round's read of done/<rank> is not lost
                lost = [(r, why) for r, why in lost if r < 0 or not store.check([f"done/{r}"])]
            except Exception:  # noqa: BLE001 -- the store's host is gone: the lost list stands as read
                pass
            if lost:
                self.report(lost, None)

    # --- diagnosis -----------------------------------------------------------------------------
    def lost_peers(self, stale_s: float) -> list[tuple[int, str]]:
        """Peers lost by the rules of the module docstring, as (rank, why); -1 = the launcher's store."""
        now, lost = time.monotonic(), []
        with self._lock:
            seen, done, store_error = dict(self._seen), set(self._done), self._store_error
        for r, (_, t) in seen.items():
            if r in done:
                continue
            p = self.peers[r]
            if p["machine"] == self.me["machine"] and process_gone(int(p["pid"])):
                lost.append((r, "its process is gone"))
            elif now - t >= stale_s and store_error is None:
                lost.append((r, f"no heart-beat for {now - t:.1f} s"))
        if store_error is not None and not lost:
            message, since = store_error
            where = f"{self.address[0]}:{self.address[1]}"
            if now - since >= min(stale_s, self.peer_timeout_s):
                if self.store_host_rank is not None and self.store_host_rank != self.rank:
                    lost.append((self.store_host_rank, f"the store it hosts at {where} is unreachable ({message})"))
                elif self.store_host_rank is None:
                    lost.append((-1, f"the launcher's store at {where} is unreachable ({message})"))
        return lost

    def diagnose(self, max_wait_s: float) -> list[tuple[int, str]]:
        """After a failure: wait up to ``max_wait_s`` for a peer to show as lost; returns [(rank, why)]."""
        deadline = time.monotonic() + max_wait_s
        while True:
            lost = self.lost_peers(3 * self.interval_s)
            if lost or time.monotonic() >= deadline:
                return lost
            time.sleep(min(0.1, self.interval_s))

    def expect_exit(self) -> None:
        """Every worker stops now (a preemption signal): peers exiting and the launcher's store going away are
        expected; ``report`` does nothing from here on."""
        with self._lock:
            self._exiting = True

    def report(self, lost: list[tuple[int, str]], cause: str | None) -> None:
        """Print the lost-worker message (once) and exit with ``LOST_WORKER_EXIT``."""
        with self._lock:
            if self._reported or self._stop.is_set() or self._exiting:
                return
            self._reported = True
        for r, why in lost:
            who = f"rank {r} ({self.host_of(r)})" if r >= 0 else "the launcher"
            self._log(f"datkit: lost worker {who}: {why}; this worker (rank {self.rank}, {self.host_of(self.rank)}) "
                      f"stops with exit code {LOST_WORKER_EXIT}" + (f" [it saw: {cause}]" if cause else ""))
        os._exit(LOST_WORKER_EXIT)

    def handle_failure(self, err: BaseException | None, max_wait_s: float = 10.0) -> None:
        """A collective raised ``err`` (or the launcher is stopping us): report a lost peer and exit, if one is
        found within ``max_wait_s``; otherwise return (the error was not a lost worker)."""
        cause = None if err is None else f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
        lost = self.diagnose(max_wait_s)
        if lost and self._store_error is None:  # a peer that finished cleanly (done/<rank>) is not lost
            try:
                lost = [(r, why) for r, why in lost if r < 0 or not self.store.check([f"done/{r}"])]
            except Exception:  # noqa: BLE001 -- the store's host is gone: the lost list stands as read
                pass
        if lost:
            self.report(lost, cause)

    def install_sigterm_handler(self) -> None:
        """On SIGTERM (a launcher stopping the job after a worker died): name the lost peer, then terminate."""
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        self._previous_sigterm = previous if previous is not None else signal.SIG_DFL

        def on_term(signum, frame):
            self.handle_failure(None, max_wait_s=3.0)
            self._restore_sigterm()
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_term)

    def _restore_sigterm(self) -> None:
        previous = getattr(self, "_previous_sigterm", None)
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
            self._previous_sigterm = None

    def stop(self, clean: bool = True) -> None:
        """Stop watching; after a clean finish, tell the peers (``done/<rank>``) that this exit is not a loss."""
        with self._lock:
            self._stop.set()
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._restore_sigterm()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval_s + 1.0)  # no store call in flight when the process exits
        if not clean:
            return
        try:
            self.store.set(f"done/{self.rank}", "1")
        except Exception:  # noqa: BLE001 -- the store's host finished first: nothing left to tell
            pass
