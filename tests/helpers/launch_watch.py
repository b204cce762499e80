"""Run a launcher in its own session, time-stamp every output line, and check that nothing is left behind.

``watch_launch`` reads stdout+stderr line by line (so a test can act on a marker: ``on_line(seconds, line,
launcher pid)``, e.g. SIGKILL a process whose pid a line names) and returns when the launcher exits or ``timeout``
passes; then it kills whatever is left in the session, reporting it (a test asserts that nothing was).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .runs import child_env


@dataclass
class Launch:
    """The outcome of ``watch_launch``: exit code, ``(seconds since start, line)`` pairs, leftovers."""

    returncode: int | None
    lines: list[tuple[float, str]] = field(default_factory=list)
    left_over: list[int] = field(default_factory=list)  # pids still in the session after the launcher exited
    exited_at: float = 0.0

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, pattern: str) -> tuple[float, re.Match] | None:
        """(time, match) of the first line matching the regular expression ``pattern``."""
        for t, line in self.lines:
            m = re.search(pattern, line)
            if m:
                return t, m
        return None

    def describe(self) -> str:
        tail = "\n".join(f"{t:7.2f} {line}" for t, line in self.lines[-80:])
        return f"exit {self.returncode} at {self.exited_at:.1f} s, left over {self.left_over}\n{tail}"


def _living_processes() -> dict[int, int]:
    """pid -> parent pid of every process that is not a zombie."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] not in ("Z", "X"):
                    parents[int(name)] = int(fields[1])
            except (OSError, IndexError):
                pass
    return parents


def session_pids(sid: int) -> list[int]:
    """Living processes of session ``sid`` (this process excluded)."""
    pids = []
    for pid in _living_processes():
        try:
            if os.getsid(pid) == sid and pid != os.getpid():
                pids.append(pid)
        except OSError:
            pass
    return pids


def process_tree(root: int) -> list[int]:
    """``root`` and all its living descendants (by parent pid; torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for pid, parent in _living_processes().items():
        children.setdefault(parent, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def watch_launch(args: Sequence[str], cwd: str | os.PathLike, timeout: float,
                 on_line: Callable[[float, str, int], None] | None = None, grace: float = 5.0, **env: str) -> Launch:
    """Run ``sys.executable *args`` in a new session; see module docstring."""
    proc = subprocess.Popen([sys.executable, *args], cwd=str(cwd), env=child_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = Launch(None)
    start = time.monotonic()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            t = time.monotonic() - start
            out.lines.append((t, line.rstrip("\n")))
            if on_line is not None:
                on_line(t, line, proc.pid)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        out.returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        out.returncode = None
    out.exited_at = time.monotonic() - start
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and session_pids(proc.pid):
        time.sleep(0.2)
    out.left_over = session_pids(proc.pid)
    for pid in [proc.pid, *out.left_over]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    reader.join(timeout=5)
    return out
