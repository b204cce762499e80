"""What a training worker wrote to its sockets, next to the ``bytes_per_iter`` it reported (issue 16, item 6).

``install()`` wraps ``Trainer.train_epoch`` (in the worker process, nothing in datkit changes): around each epoch's
training it reads the process's ``wchar`` (``/proc/self/io``: bytes written by ``write``/``writev``/``send``, every
thread included; gloo's TCP pairs write with ``writev``, so this is the worker's own traffic, which other processes
on the host cannot disturb, as in ``datkit.bench comm``), and appends one JSON line per epoch to
``$DATKIT_TEST_WIRE_DIR/wire_rank<R>.jsonl``: ``{"run", "epoch", "steps", "written", "bytes_per_iter"}``.

The window is the whole ``train_epoch`` call: the steps (the gradient communication ``bytes_per_iter`` counts),
plus the epoch's loss statistic (16 bytes) and a backend's control traffic (Horovod's negotiation); nothing
writes files in it (progress bars are off in the tests). ``wire_ratios`` reads the files back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def written_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def install(run_name: str | None = None) -> None:
    """Wrap ``Trainer.train_epoch`` / ``train_step`` so that every epoch's socket writes are recorded."""
    from datkit.engine import trainer as trainer_mod

    cls = trainer_mod.Trainer
    if getattr(cls, "_wire_installed", False):
        return
    out_dir = Path(os.environ["DATKIT_TEST_WIRE_DIR"])
    epoch_fn, step_fn = cls.train_epoch, cls.train_step

    def train_step(self, *args, **kwargs):
        self._wire_steps = getattr(self, "_wire_steps", 0) + 1
        return step_fn(self, *args, **kwargs)

    def train_epoch(self, epoch: int):
        self._wire_steps = 0
        before = written_bytes()
        result = epoch_fn(self, epoch)
        written = written_bytes() - before
        rec = {"run": os.environ.get("DATKIT_TEST_WIRE_RUN", run_name or str(self.out)), "out": str(self.out),
               "epoch": epoch, "steps": self._wire_steps, "written": written, "bytes_per_iter": self.bytes_per_iter,
               "world_size": self.backend.world_size, "backend": self.backend.name}
        with open(out_dir / f"wire_rank{self.backend.rank}.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        return result

    cls.train_epoch, cls.train_step = train_epoch, train_step
    cls._wire_installed = True


def wire_records(folder: str | os.PathLike) -> list[dict]:
    """Every record of every rank in ``folder`` (each with its ``rank``)."""
    recs = []
    for path in sorted(Path(folder).glob("wire_rank*.jsonl")):
        rank = int(path.stem.removeprefix("wire_rank"))
        recs += [{**json.loads(line), "rank": rank} for line in path.read_text().splitlines() if line.strip()]
    return recs


def wire_ratios(folder: str | os.PathLike, run: str | None = None) -> list[tuple[str, int, int, float]]:
    """``(run, rank, epoch, written per step / bytes_per_iter)`` of every recorded epoch (of ``run`` if given)."""
    return [(r["run"], r["rank"], r["epoch"], r["written"] / r["steps"] / r["bytes_per_iter"])
            for r in wire_records(folder) if run is None or r["run"] == run]
