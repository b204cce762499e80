"""``backend: auto``: recognise the launcher from its environment.

- horovodrun sets ``HOROVOD_RANK`` (gloo controller) -> ``horovod``;
- the ``deepspeed`` launcher starts processes with ``CROSS_RANK``/``LOCAL_SIZE`` and appends
  ``--local_rank`` (torchrun sets ``TORCHELASTIC_RUN_ID`` instead) -> ``deepspeed``;
- an MPI launcher (``mpirun``, ``horovodrun --mpi``, which sets no ``HOROVOD_*`` variable, ``srun
  --mpi=pmix``) sets its rank variable (``OMPI_COMM_WORLD_RANK``, ``PMIX_RANK``, ``PMI_RANK``) -> ``horovod``
  (Horovod's MPI controller; torch.distributed needs ``RANK``/``WORLD_SIZE``, and with those set it is torch);
- anything else (torchrun, a plain ``python``) -> ``torch``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

_MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


def detect_backend(env: Mapping[str, str] | None = None, argv: Sequence[str] = ()) -> str:
    """Name of the backend the launcher in ``env`` (default ``os.environ``) implies."""
    env = os.environ if env is None else env
    if any(k in env for k in ("HOROVOD_RANK", "HOROVOD_CONTROLLER", "HOROVOD_HOSTNAME")):
        return "horovod"
    launched_by_torchrun = "TORCHELASTIC_RUN_ID" in env
    local_rank_arg = any(a.startswith(("--local_rank", "--local-rank")) for a in argv)
    if not launched_by_torchrun and ("CROSS_RANK" in env or "LOCAL_SIZE" in env or local_rank_arg):
        return "deepspeed"
    if not launched_by_torchrun and "WORLD_SIZE" not in env and any(k in env for k in _MPI_RANK_VARS):
        return "horovod"
    return "torch"
