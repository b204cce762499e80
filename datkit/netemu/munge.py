"""munge, Slurm's authentication, for clusters on emulated hosts: one munged for the whole machine.

munged listens on a unix socket (``/run/munge/munge.socket.2``), a file, so every network namespace
reaches the same daemon. :func:`ensure_munged` starts it (as the ``munge`` user, with the key
``/etc/munge/munge.key``, created by ``mungekey`` if missing) only when none answers, and records that in
the cluster's state folder; :func:`release_munged` stops it only when this cluster started it and no other
cluster (``/run/datkit-slurm-*``) is still up.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from datkit.netemu.hosts import NetemuError

KEY = Path("/etc/munge/munge.key")
RUN_DIR = Path("/run/munge")
PID_FILE = RUN_DIR / "munged.pid"
OWNED = "munged.started"  # in the cluster's state folder: this cluster started munged (its pid inside)


def munge_works() -> bool:
    """A credential encodes and decodes through the running munged."""
    if shutil.which("munge") is None or shutil.which("unmunge") is None:
        return False
    enc = subprocess.run(["munge", "-n"], capture_output=True)
    return enc.returncode == 0 and subprocess.run(["unmunge"], input=enc.stdout, capture_output=True).returncode == 0


def ensure_munged(state: Path, timeout: float = 10.0) -> bool:
    """Make sure a munged answers; start one if not. True when this call started it (recorded in ``state``)."""
    if munge_works():
        return False
    if not KEY.exists():
        subprocess.run(["mungekey", "--create", f"--keyfile={KEY}"], check=True, capture_output=True)
        shutil.chown(KEY, "munge", "munge")
        KEY.chmod(0o600)
    RUN_DIR.mkdir(mode=0o755, exist_ok=True)
    shutil.chown(RUN_DIR, "munge", "munge")
    proc = subprocess.run(["runuser", "-u", "munge", "--", "munged"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetemuError(f"munged did not start: {proc.stderr.strip()}")
    deadline = time.monotonic() + timeout
    while not munge_works():
        if time.monotonic() > deadline:
            raise NetemuError("munged started but 'munge -n | unmunge' still fails (see /var/log/munge/munged.log)")
        time.sleep(0.1)
    (state / OWNED).write_text(PID_FILE.read_text().strip() if PID_FILE.exists() else "")
    return True


def release_munged(state: Path, others: list[Path]) -> bool:
    """Stop munged if ``state`` records that its cluster started it and no cluster in ``others`` is up (then
    the record moves to one of them, which stops it when it goes down)."""
    mark = state / OWNED
    if not mark.exists():
        return False
    if others:
        shutil.move(str(mark), str(others[0] / OWNED))
        return False
    pid = mark.read_text().strip()
    if pid.isdigit():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return True
