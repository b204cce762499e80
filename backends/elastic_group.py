"""The process group of a worker started by torchrun, also after ``--max-restarts`` restarted the job.

Used by the torch backend and, for restarted attempts, by the DeepSpeed backend (``deepspeed.init_distributed``
then finds the group initialized and adopts it).
"""
from __future__ import annotations

import datetime
import os

import torch.distributed as dist


def restart_attempt() -> int:
    """torchrun's restart count of this worker (0: the first attempt, or not under torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def init_group_for_attempt(backend: str, timeout: datetime.timedelta) -> None:
    """``init_process_group`` from torchrun's environment; after a restart (``--max-restarts``) under a fresh key
    prefix.

    torchrun keeps its agent's TCPStore across restarts, and gloo publishes each rank's listening address under the
    same keys in every attempt: a restarted rank 0 could read the dead attempt's address of rank 1 and fail with
    "Connection refused" (seen in CI). Attempt n > 0 therefore keeps its keys under ``datkit/attempt_n/``.
    """
    attempt = restart_attempt()
    if attempt == 0:
        dist.init_process_group(backend, timeout=timeout)
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=rank == 0 and not agent_hosts_store, timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"datkit/attempt_{attempt}", store), rank=rank,
                            world_size=world_size, timeout=timeout)
