"""Checkpoint files: atomic writes (temp file + fsync + rename) and ``weights_only=True`` loads.

A job killed during a write leaves the previous checkpoint intact: the new file only replaces it
with ``os.replace`` once it is completely on disk (the rename is atomic within one file system, hence
the temp file in the same folder; the folder is fsynced after the rename so the new name is durable).
A killed write can leave a ``.tmp-*.pt`` file behind; the next successful save of the same checkpoint
removes such leftovers.

TEST-ONLY: ``DATKIT_TEST_CHECKPOINT_WRITE_DELAY_S=X`` sleeps ``X`` seconds between the fsynced temp file
and the rename (after printing ``datkit-test: checkpoint temp file written``), so that a test can kill
the job inside the write window.
"""
from __future__ import annotations

import glob
import os
import sys
import tempfile
import time
from typing import Any

import torch


def atomic_save(state: dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        delay = float(os.environ.get("DATKIT_TEST_CHECKPOINT_WRITE_DELAY_S", "0") or 0)
        if delay > 0:  # test-only: widen the write window
            print(f"datkit-test: checkpoint temp file written ({tmp}); renaming in {delay} s", file=sys.stderr, flush=True)
            time.sleep(delay)
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for stale in glob.glob(os.path.join(folder, ".tmp-*.pt")):  # left by a write that was killed
        if stale != tmp:
            try:
                if time.time() - os.path.getmtime(stale) > 1.0:
                    os.unlink(stale)
            except OSError:
                pass


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint_file(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs on load)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)
