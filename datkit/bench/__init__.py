"""Benchmarks of datkit against plain PyTorch: ``python -m datkit.bench SUBCOMMAND [options]``.

This package is a developer tool, not library API: it measures datkit and may import any part of it, while no
library module imports it (``tests/test_architecture.py`` checks this); it ships inside the package only so that
``python -m datkit.bench`` runs from any install.

Each subcommand lives in its own module with a ``main(argv) -> int`` function and is imported only
when it runs. To add one, add an entry to :data:`SUBCOMMANDS` (name -> (module, one-line summary)).

- ``step``: one PGD-AT training step of datkit vs a hand-written PyTorch loop, alternated in one process.
- ``zero``: per-worker optimizer-state memory at ZeRO stages 1/2 vs 0 (deepspeed backend).
- ``comm``: each gradient compressor's bytes per iteration, loopback check, time and error (under torchrun).
- ``ibp``: an IBP / CROWN-IBP training step relative to a clean training step of the same model and batch.
- ``network``: per-epoch C and T of each compressor across emulated hosts (network namespaces, tc tbf links).
"""
from __future__ import annotations

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "step": ("datkit.bench.step", "time one PGD-AT training step of datkit against a plain PyTorch loop"),
    "zero": ("datkit.bench.zero", "per-worker optimizer-state memory at DeepSpeed ZeRO stages vs stage 0 (2+ workers)"),
    "comm": ("datkit.bench.comm",
             "bytes, time and error of each gradient compressor vs a float32 allreduce (torchrun, 2+ workers)"),
    "ibp": ("datkit.bench.ibp",
            "time an IBP and a CROWN-IBP training step relative to a clean step of the same model and batch"),
    "network": ("datkit.bench.network",
                "per-epoch C and T of each compressor across emulated hosts and link rates (root)"),
}

__all__ = ["SUBCOMMANDS"]
