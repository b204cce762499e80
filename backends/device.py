"""The device choice of every backend, written once: ``device`` auto | cpu | cuda, then one GPU per local rank."""
from __future__ import annotations

import torch


def wants_cuda(device: str) -> bool:
    """Whether ``device`` (auto | cpu | cuda) runs on CUDA here (decides NCCL or gloo before the process group
    starts); ``RuntimeError`` when ``cuda`` is asked for and no CUDA device is available."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is available (use device=cpu or auto)")
    return want_cuda


def bind_device(want_cuda: bool, local_rank: int) -> torch.device:
    """This worker's device: GPU ``local_rank`` (made the current CUDA device) when ``want_cuda``, else the CPU."""
    if not want_cuda:
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)
