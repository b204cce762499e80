"""Command-line parsing shared by ``datkit.train`` and the jobs on a checkpoint (``datkit.evaluate``,
``datkit.certify``).

Accepted: ``--config FILE`` (or ``--config=FILE``), ``key=value`` overrides, and the
``--local_rank=N`` / ``--local-rank N`` argument that launchers (deepspeed, torch.distributed.launch)
append; the latter sets ``LOCAL_RANK`` when the launcher did not.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from datkit.config import ConfigError


def parse_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Return (config path, overrides) from ``argv`` (without the program name)."""
    config, overrides, args = None, [], list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            raise SystemExit(USAGE)
        if a in ("--config", "-c") or a.startswith("--config="):
            if "=" in a:
                config = a.split("=", 1)[1]
            elif i + 1 < len(args):
                config, i = args[i + 1], i + 1
            else:
                raise ConfigError("--config needs a file name")
        elif a.startswith(("--local_rank", "--local-rank")):
            if "=" in a:
                value = a.split("=", 1)[1]
            elif i + 1 < len(args):
                value, i = args[i + 1], i + 1
            else:
                raise ConfigError(f"{a} needs a value")
            os.environ.setdefault("LOCAL_RANK", value)
        elif a.startswith("-"):
            raise ConfigError(f"unknown option '{a}'; use --config FILE and key=value overrides (see --help)")
        else:
            overrides.append(a)
        i += 1
    return config, overrides


def launcher_rank() -> str:
    """This process's rank as its launcher set it (torchrun / deepspeed: ``RANK``; horovodrun: ``HOROVOD_RANK``;
    mpirun: ``OMPI_COMM_WORLD_RANK`` / ``PMI_RANK``); "0" when none is set (one process)."""
    for key in ("RANK", "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if key in os.environ:
            return os.environ[key]
    return "0"


# How long a worker other than rank 0 waits before it exits with a start-up error (see ``fail``).
PEER_FAIL_GRACE_S = 10.0


def fail(err: BaseException, code: int = 2) -> None:
    """Print a start-up error once (rank 0 as the launcher numbers them) and exit with ``code``.

    Every worker finds the same error; the others exit without a word, but not first: a launcher stops the
    whole job as soon as one worker exits (torchrun's agent SIGTERMs the rest at once), and a rank 1 that
    was quicker would have rank 0 killed before it printed (measured: a bad value under torchrun printed
    nothing). So the other ranks wait up to ``PEER_FAIL_GRACE_S`` for rank 0 to exit, and exit with ``code``
    at once when the launcher's SIGTERM comes."""
    if launcher_rank() == "0":
        print(f"datkit: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(code)
    import signal
    import time

    sys.stdout.flush()
    sys.stderr.flush()
    watch = sys.modules.get("datkit.backends.peer_watch")  # an error found after the backend started (a plug-in):
    if watch is not None:  # stop the heart-beats first, as a clean finish, or rank 0's exit would read as a loss
        watch._stop_all()
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(code))
    except ValueError:  # not the main thread: no handler, no wait
        raise SystemExit(code) from None
    time.sleep(PEER_FAIL_GRACE_S)
    raise SystemExit(code)


USAGE = """usage: python -m datkit.train [--config FILE] [key=value ...]
       torchrun --nproc_per_node N -m datkit.train [--config FILE] [key=value ...]

Keys are those of datkit.config.schema (see docs/reference/config.md), e.g.
  python -m datkit.train --config configs/mnist_pgd.yaml train.epochs=3 attack.steps=10 backend=torch"""
