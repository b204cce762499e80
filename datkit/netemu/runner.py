"""Run one datkit job across emulated hosts: up, start each host's launcher in its namespace, wait, down.

Teardown is in a ``finally`` and SIGINT / SIGTERM / SIGHUP are turned into an exception while the job
runs, so Ctrl-C, ``kill`` and errors all end with the launchers' process groups killed and the
namespaces deleted (which also kills anything left inside them, see :func:`datkit.netemu.hosts.down`).
When one host's launcher exits non-zero, the others get ``grace`` seconds to exit on their own (the
backends' own failure detection) before they are killed; the job's exit code is the first non-zero one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from datkit.netemu.hosts import Topology, down, ns_exec, up
from datkit.netemu.launch import LaunchSpec, base_env, host_commands, render


class Interrupted(Exception):
    """A signal (Ctrl-C, SIGTERM, SIGHUP) arrived while a job was running."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM/SIGHUP raise :class:`Interrupted` (previous handlers restored after)."""
    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGTERM each still running launcher's process group, SIGKILL after ``grace`` seconds."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        _kill_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in running:
        if p.poll() is None:
            _kill_group(p, signal.SIGKILL)
        p.wait()


def wait_all(procs: Sequence[subprocess.Popen], grace: float, timeout: float | None) -> int:
    """Wait for every launcher; after the first failure give the rest ``grace`` s; 0 or the first failure's code.

    ``timeout`` (seconds, None = none) bounds the whole job: past it every launcher is stopped and 124 returned.
    """
    start, first_bad, bad_at = time.monotonic(), 0, None
    while True:
        codes = [p.poll() for p in procs]
        for c in codes:
            if c not in (None, 0) and not first_bad:
                first_bad, bad_at = c, time.monotonic()
        if all(c is not None for c in codes):
            return first_bad
        now = time.monotonic()
        if bad_at is not None and now - bad_at > grace:
            _stop(procs, 5.0)
            return first_bad
        if timeout is not None and now - start > timeout:
            _stop(procs, 5.0)
            return 124
        time.sleep(0.2)


def launch_on_hosts(topo: Topology, backend: str, overrides: Sequence[str], workers_per_host: int = 1,
                    port: int = 29500, grace: float = 60.0, timeout: float | None = None, log: IO[str] | None = None,
                    workdir: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
                    launcher: str | None = None) -> int:
    """Run ``backend``'s multi-node launch of ``datkit.train overrides`` on hosts that are up, by ``launcher``
    (default: the backend's own, see :data:`datkit.netemu.launch.LAUNCHES`); returns the job's exit code (124:
    ``timeout`` passed). Each launcher's output goes to ``log`` (default: this process's stdout/stderr).
    Launchers still running when this returns or raises are killed."""
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix=f"netemu-{topo.prefix}-")) if own_tmp else Path(workdir)
    procs: list[subprocess.Popen] = []
    try:
        spec = LaunchSpec(topo, workers_per_host, list(overrides), work, port)
        cmds = host_commands(backend, spec, launcher)
        env = base_env(spec)
        if log is not None:
            print(render(cmds, topo), file=log, flush=True)
        for c in cmds:
            procs.append(subprocess.Popen([*ns_exec(topo.host_ns(c.host)), *c.argv], env={**env, **c.env},
                                          cwd=cwd, stdout=log, stderr=subprocess.STDOUT if log else None,
                                          start_new_session=True))
        return wait_all(procs, grace, timeout)
    finally:
        with signals_blocked():
            _stop(procs, 5.0)
            if own_tmp:
                shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def hosts_up(topo: Topology) -> Iterator[Topology]:
    """``up(topo)`` for the block; on leaving it (normally, by an error, or by Ctrl-C / SIGTERM / SIGHUP,
    which raise :class:`Interrupted` inside) every process in the hosts is killed and the hosts removed."""
    with signals_raise():
        try:
            yield up(topo)
        finally:
            with signals_blocked():
                down(topo.prefix)


def run_job(topo: Topology, backend: str, overrides: Sequence[str], workers_per_host: int = 1, **kwargs) -> int:
    """Create ``topo``'s hosts, run ``backend``'s multi-node launch across them (:func:`launch_on_hosts`,
    ``kwargs`` passed on), tear everything down. Returns the job's exit code; raises :class:`Interrupted`
    after teardown when a signal stopped it."""
    with hosts_up(topo):
        return launch_on_hosts(topo, backend, overrides, workers_per_host, **kwargs)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Ignore a second Ctrl-C / SIGTERM while tearing down, so teardown itself is not interrupted."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
