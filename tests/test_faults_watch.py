"""``backends/peer_watch.py`` in one process: a dead peer, a silent peer, a peer that finished cleanly.

The peers are entries in a real TCPStore written by the test; the launcher tests (``test_faults.py``)
cover the same watch with real workers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch.distributed as dist

from datkit.backends import peer_watch
from datkit.backends.peer_watch import LOST_WORKER_EXIT, PeerWatch, store_client

LONG = 3600.0  # a staleness no test run reaches


def _until(cond: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    """Poll ``cond`` every 50 ms until it holds (True) or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _register(store, rank: int, pid: int, machine: str) -> None:
    store.add(f"hb/{rank}", 0)
    store.set(f"peer/{rank}", json.dumps({"host": f"h{rank}", "address": f"198.18.0.{rank + 1}", "pid": pid,
                                          "machine": machine}))


def test_dead_silent_and_finished_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    connect = lambda: store_client("127.0.0.1", master.port, "t", 5.0)  # noqa: E731
    store = connect()
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    done = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    here = peer_watch._machine_id()
    _register(store, 1, dead.pid, here)      # a process on this machine that will be killed
    _register(store, 2, 1, "another-machine")  # elsewhere; its heart-beat never moves
    _register(store, 3, done.pid, here)      # finishes cleanly (done/3) before it exits
    reports: list[list[tuple[int, str]]] = []
    watch = PeerWatch(connect, ("127.0.0.1", master.port), 0, 4, peer_timeout_s=2.0, startup_timeout_s=5.0,
                      store_host_rank=None)
    monkeypatch.setattr(watch, "report", lambda lost, cause: reports.append(lost))  # no os._exit in the test
    # No fixed sleeps: every wait polls for its condition (a loaded machine may delay the watch's thread by
    # seconds); "not yet lost" is asked with a staleness (LONG) that no scheduling delay reaches.
    try:
        assert watch.lost_peers(LONG) == []
        assert watch.host_of(2) == "host h2 (198.18.0.3), pid 1"
        store.set("done/3", "1")
        assert _until(lambda: 3 in watch._done), "the watch's thread never read done/3"
        for p in (dead, done):
            p.kill()
            p.wait()
        lost = dict(watch.lost_peers(LONG))
        assert lost == {1: "its process is gone"}  # at once; not rank 3 (done), not rank 2 (silent < LONG)
        assert _until(lambda: 2 in dict(watch.lost_peers(2.0))), "the silent rank 2 was never reported"
        lost = dict(watch.lost_peers(2.0))
        assert set(lost) == {1, 2} and lost[2].startswith("no heart-beat for")
        assert _until(lambda: bool(reports)), "the thread reported nothing"
        assert {r for r, _ in reports[0]} <= {1, 2}  # the thread reported them on its own
        assert _until(lambda: int(store.get("hb/0")) >= 2)  # and heart-beat meanwhile
    finally:
        watch.stop()
    assert store.check(["done/0"])  # a clean stop tells the peers


def test_report_names_the_rank_host_and_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    connect = lambda: store_client("127.0.0.1", master.port, "r", 5.0)  # noqa: E731
    _register(connect(), 1, 4242, "another-machine")
    lines: list[str] = []
    watch = PeerWatch(connect, ("127.0.0.1", master.port), 0, 2, peer_timeout_s=30.0, startup_timeout_s=5.0,
                      store_host_rank=None, log=lines.append)

    def fake_exit(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    try:
        with pytest.raises(SystemExit) as exit_:
            watch.report([(1, "no heart-beat for 31.0 s")], "RuntimeError: Connection reset by peer")
    finally:
        watch.stop(clean=False)
    assert exit_.value.code == LOST_WORKER_EXIT == 3
    assert lines[0].startswith("datkit: lost worker rank 1 (host h1 (198.18.0.2), pid 4242): no heart-beat for 31.0 s; "
                               "this worker (rank 0, host ")
    assert lines[0].endswith("stops with exit code 3 [it saw: RuntimeError: Connection reset by peer]")
