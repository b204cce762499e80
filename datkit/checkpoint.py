"""Checkpoint files: atomic writes (temp file + fsync + rename) and ``weights_only=True`` loads.

A job killed during a write leaves the previous checkpoint intact: the new file only replaces it
with ``os.replace`` once it is completely on disk.
"""
from __future__ import annotations

import os
import tempfile
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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint_file(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs on load)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)
