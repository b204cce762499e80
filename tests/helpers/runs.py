"""Tiny, fast training settings and helpers to run ``datkit.train`` in-process or as a subprocess.

Everything here is CPU-only and sized for a 2-core machine: the 8x8 ``digits`` data set, ``cnn_small``
with 8/16 channels and a 32-unit hidden layer, 2 PGD steps (random start on, as by default), 50 evaluation
samples, no TensorBoard, no plots, no progress bars.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
OFFICIAL_MNIST_RAW = SHARED_DATA / "MNIST" / "raw"

# Overrides shared by every tiny run (the caller adds train.output_dir, epochs, steps, ...).
TINY: list[str] = [
    "backend=torch",
    "device=cpu",
    "data.name=digits",
    "model.name=cnn_small",
    "model.kwargs.channels=[8,16]",
    "model.kwargs.hidden=32",
    "method.name=pgd",
    "attack.steps=2",
    "train.batch_size=32",
    "train.seed=1",
    "eval.every=1",
    "eval.num_samples=50",
    "eval.final_num_samples=50",
    "eval.batch_size=50",
    "eval.pgd_steps=2",
    "eval.aa_samples=0",  # AutoAttack in the final evaluation: tests/test_results.py and test_autoattack_eval.py
    "eval.co_samples=32",
    "log.tensorboard=false",
    "log.plot=false",
    "log.progress=false",
]

# Launcher variables that must not leak from the environment pytest runs in into a child.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "CROSS_RANK", "LOCAL_SIZE")


def installed(module: str) -> bool:
    """``module`` imports here (installed and built for this torch: a Horovod built for another torch fails)."""
    try:
        __import__(module)
    except ImportError:
        return False
    return True


NO_HOROVOD = "needs Horovod (launchers/install_horovod.sh)"


def no_horovod_mpi() -> str | None:
    """Why Horovod cannot run over MPI here (mpirun, horovodrun --mpi, srun --mpi=pmix); None: it can."""
    if not installed("horovod.torch"):
        return NO_HOROVOD
    import horovod.torch as hvd

    if not hvd.mpi_built():
        return ("needs Horovod built with MPI (install Open MPI: launchers/install_cluster_tools.sh, then rebuild: "
                "HOROVOD_INSTALL_FORCE=1 launchers/install_horovod.sh)")
    return None if shutil.which("mpirun") else "needs Open MPI's mpirun on PATH (launchers/install_cluster_tools.sh)"


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` without launcher variables, one thread per process, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(("TORCHELASTIC_", "HOROVOD_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_python(args: Sequence[str], cwd: str | os.PathLike, timeout: float = 240,
               **env: str) -> subprocess.CompletedProcess:
    """``sys.executable *args`` in ``cwd``; stdout/stderr captured as text."""
    return subprocess.run([sys.executable, *args], cwd=str(cwd), env=child_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def describe(proc: subprocess.CompletedProcess) -> str:
    """The tail of a finished process's output, for assertion messages."""
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread (tiny models on a shared 2-core machine: threads only contend)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def train_inprocess(overrides: Sequence[str]) -> dict[str, Any]:
    """``datkit.train.main(TINY + overrides)`` in this process; returns the final results record."""
    from datkit.train import main

    with one_thread():
        return main([*TINY, *overrides])


def load_checkpoint(out_dir: str | os.PathLike) -> dict[str, Any]:
    """``out_dir/checkpoint_last.pt`` loaded with ``weights_only=True``."""
    return torch.load(Path(out_dir) / "checkpoint_last.pt", map_location="cpu", weights_only=True)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    """Both state dicts have the same keys and every tensor agrees to ``atol``."""
    assert sorted(a) == sorted(b), f"different parameter names: {sorted(a)} vs {sorted(b)}"
    for k in a:
        assert a[k].shape == b[k].shape, f"{k}: shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        diff = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
        assert diff <= atol, f"{k}: max |difference| {diff:.3g} > {atol}"
