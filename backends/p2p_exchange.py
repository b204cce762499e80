"""``all_to_all`` and ``all_gather`` as point-to-point messages with every receive posted before any send.

Used by the torch.distributed and DeepSpeed backends when the process group runs gloo (CPU), for the
compressed gradient exchange (``datkit.compress``: an ``all_to_all`` of the compressed chunks, then an
``all_gather`` of the averages). Same bytes on the wire as gloo's own collectives: ``all_to_all`` sends
block j of dim 0 to rank j ((M-1)/M of the tensor), ``all_gather`` sends the tensor to each of the M-1
other ranks (what a ring sends too, M-1 times the input).

Why: gloo's ``all_to_all_single`` and ``all_gather_into_tensor`` post their sends before their receives.
Measured between two emulated hosts on a 100 Mbit/s link (``datkit.netemu``, 420 KB each way per phase,
an ``all_to_all`` then an ``all_gather``, 16 repetitions): median 87-90 ms per pair of phases with gloo's
collectives, 102 ms with ``isend`` before ``irecv``, and 61 ms (the link's rate: 2 x 420 KB at
12.25 MB/s is 69 ms, less the tbf burst) with every ``irecv`` posted first; single messages took
either ~26 ms or ~51 ms, i.e. a stall of ~25 ms, unless the receive was posted first. The exchange is
therefore written here with ``irecv`` first. NCCL keeps its own collectives.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def use_p2p_exchange(group: dist.ProcessGroup | None = None) -> bool:
    """True when the (default) process group runs gloo, whose collectives are slower than receive-first p2p."""
    return dist.is_initialized() and dist.get_backend(group) == "gloo"


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def p2p_all_to_all(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Row block j of ``tensor`` (dim 0, ``world_size`` equal blocks) to rank j; block i of the result came
    from rank i. Every rank must call it with the same shape."""
    if tensor.shape[0] % world_size:
        raise ValueError(f"all_to_all: dim 0 ({tensor.shape[0]}) is not a multiple of world_size ({world_size})")
    src = tensor.contiguous()
    out = torch.empty_like(src)
    send, recv = src.chunk(world_size), out.chunk(world_size)
    peers = [p for p in range(world_size) if p != rank]
    works = [dist.irecv(recv[p], src=p) for p in peers]
    works += [dist.isend(send[p].contiguous(), dst=p) for p in peers]
    recv[rank].copy_(send[rank])
    _wait(works)
    return out


def p2p_all_gather(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """``(world_size, *tensor.shape)``: row i is rank i's ``tensor``. Every rank must call it with the same shape."""
    src = tensor.contiguous()
    out = torch.empty((world_size, *src.shape), dtype=src.dtype, device=src.device)
    peers = [p for p in range(world_size) if p != rank]
    works = [dist.irecv(out[p], src=p) for p in peers]
    works += [dist.isend(src, dst=p) for p in peers]
    out[rank].copy_(src)
    _wait(works)
    return out
