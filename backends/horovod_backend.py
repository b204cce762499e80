"""The ``horovod`` backend: Horovod's collectives and DistributedOptimizer, launched by ``horovodrun``.

``horovodrun -np 2 -H localhost:2 --gloo python -m datkit.train backend=horovod`` (one host, CPU or one
GPU per local rank), ``horovodrun -np 16 -H a:8,b:8 ...`` or ``--hostfile`` (several hosts), or, when
Horovod was built with MPI, ``horovodrun --mpi``, ``mpirun -np 2 python -m datkit.train backend=horovod``
and ``srun --mpi=pmix`` (Horovod's MPI controller; nothing here differs, see docs/mpi.md). Horovod is built
for the installed torch by ``launchers/install_horovod.sh`` (its last release does not build against
torch >= 2.1 as published; with Open MPI present it builds gloo and MPI in one).

- Set-up: ``hvd.init()``; rank/size/local rank/local size from Horovod; rank 0's parameters and buffers
  are broadcast (``hvd.broadcast_parameters``), and its optimizer state when it has any
  (``hvd.broadcast_optimizer_state``).
- Gradients: ``compression.name`` none / fp16 -> ``hvd.DistributedOptimizer`` (fp16 through Horovod's
  ``Compression.fp16`` hook; ``backends.horovod_sync`` says why and how C/bytes are metered);
  int8 / onebit / bf16 -> the plain optimizer, and datkit's compressor reduces the gradients in ``step``
  (``GradientSync.reduce_gradients``) over Horovod's ``alltoall``/``allgather`` -- Horovod's own allreduce
  would *sum* int8 codes or sign bits, which is meaningless.
- Collectives: ``horovod_collectives.HorovodCollectives`` (``hvd.allreduce`` / ``allgather`` / ``alltoall`` /
  ``broadcast`` / ``barrier``; int8/uint8 payloads work over gloo); attacks and bounds run on the unwrapped model.
- Checkpoints: ``checkpoint_io.CheckpointIO``, as the torch backend's (rank 0 writes; the optimizer is replicated on
  every worker).
"""
from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import torch
from torch import nn

from .base import Backend, BackendUnavailable
from .device import bind_device, wants_cuda
from .horovod_collectives import HorovodCollectives
from .horovod_sync import MeteredDistributedOptimizer
from .spec import BackendSpec

# Set by horovodrun (gloo: HOROVOD_RANK, ...) and by MPI launchers (mpirun, srun --mpi) that Horovod's MPI
# controller can use.
_HOROVODRUN_VARS = ("HOROVOD_RANK", "HOROVOD_CONTROLLER", "HOROVOD_HOSTNAME")
_MPI_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")

LAUNCH_HINT = ("run it under horovodrun, e.g. `horovodrun -np 2 -H localhost:2 --gloo python -m datkit.train "
               "backend=horovod ...` (launchers/horovodrun_local.sh; one worker: -np 1 -H localhost:1), or use "
               "backend=torch for a plain `python -m datkit.train`")


def launch_problem(env: Mapping[str, str], mpi_built: bool) -> str | None:
    """Why this process cannot run as a Horovod worker (None when it can).

    A plain ``python`` has no launcher variables: Horovod would silently run one worker. Under
    ``mpirun`` without Horovod's MPI support, every process would be its own 1-worker job.
    """
    if any(k in env for k in _HOROVODRUN_VARS):
        return None
    if any(k in env for k in _MPI_VARS):
        if mpi_built:
            return None
        return ("backend=horovod is not available under an MPI launcher: this Horovod was built without MPI, so every "
                "process would train alone. Launch with `horovodrun --gloo` instead, or rebuild Horovod with MPI "
                "(launchers/install_horovod.sh builds it when `mpicxx` is on PATH)")
    return (f"backend=horovod is not available in a process that horovodrun did not start (a plain `python` would "
            f"silently train alone): {LAUNCH_HINT}")


class HorovodBackend(Backend):
    """Horovod backend (see module docstring)."""

    name = "horovod"

    def __init__(self, spec: BackendSpec, env: Mapping[str, str] | None = None) -> None:
        import horovod.torch as hvd

        problem = launch_problem(os.environ if env is None else env, hvd.mpi_built())
        if problem is not None:
            raise BackendUnavailable(problem)
        want_cuda = wants_cuda(spec.device)
        hvd.init()
        self.hvd = hvd
        self._alive = True
        collectives = HorovodCollectives(hvd, hvd.rank(), hvd.size())
        local_rank = hvd.local_rank()
        device = bind_device(want_cuda, local_rank)  # one GPU per local rank
        if spec.sync_bn and collectives.world_size > 1:
            from datkit.config import ConfigError

            raise ConfigError("model.sync_bn=true is not supported with backend=horovod: datkit's global BatchNorm "
                              "reduces over torch.distributed, which Horovod does not set up (its statistics would "
                              "silently stay per worker); use model.sync_bn=false, or backend=torch")
        self.bucket_cap_mb = spec.dist.bucket_cap_mb
        self.grad_accum = int(spec.train.grad_accum)
        self._sync: MeteredDistributedOptimizer | None = None
        super().__init__(collectives, device, local_rank, hvd.local_size(), self.bucket_cap_mb)

    def describe(self) -> str:
        controller = "mpi" if self.hvd.mpi_enabled() else "gloo"
        if self.world_size == 1:
            grads = "none (1 worker)"
        elif self.grads.comm_optimizer is not None:
            grads = f"{type(self.grads.comm_optimizer).__name__}'s own exchange over hvd.allreduce/alltoall/allgather"
        elif self._uses_horovod_optimizer():
            grads = f"hvd.DistributedOptimizer(compression={'fp16' if self.compressor is not None else 'none'})"
        else:
            grads = f"datkit {self.compressor.describe()} over hvd.alltoall/allgather"
        return super().describe() + f" controller={controller} gradients={grads}"

    def _uses_horovod_optimizer(self) -> bool:
        return (self.compressor is None or self.compressor.name == "fp16") and self.grads.comm_optimizer is None

    # --- model and gradients --------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = model.to(self.device)
        self.grads.attach_optimizer(optimizer)
        if self.world_size == 1:
            return model, optimizer
        hvd = self.hvd
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # parameters and buffers (BN statistics)
        # A fresh optimizer (every start: a resumed run loads its checkpoint on every rank after set-up) has no
        # state to broadcast, and hvd.broadcast_optimizer_state would first *create* state with one optimizer
        # step on zero gradients (weight decay moves the weights, Adam's step count advances), so that the run
        # would no longer take the steps of the torch backend. Only rank 0's decision counts.
        if hvd.broadcast_object(len(optimizer.state) > 0 if self.rank == 0 else None, root_rank=0,
                                name="datkit.optimizer_has_state"):
            hvd.broadcast_optimizer_state(optimizer, root_rank=0)
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # undo that zero-gradient step elsewhere
        if self._uses_horovod_optimizer():
            self._sync = MeteredDistributedOptimizer(hvd, self.grads, optimizer, model,
                                                     fp16=self.compressor is not None,
                                                     backward_passes_per_step=self.grad_accum,
                                                     group_cap_mb=self.bucket_cap_mb)
            optimizer = self._sync.optimizer
        return model, optimizer

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        if self._sync is not None:
            self._sync.synchronize()  # clip the averaged gradients
        return super().clip_grad_norm(model, max_norm)

    def gradients_averaged_in_backward(self) -> bool:
        return self._sync is not None  # hvd.DistributedOptimizer; datkit's compressors reduce in ``step``

    def nonfinite_gradients(self, model: nn.Module) -> tuple[bool, bool]:
        if self._sync is not None:
            self._sync.synchronize()  # the averaged gradients (Horovod averages in place, asynchronously)
        return super().nonfinite_gradients(model)

    def skip_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._sync is not None:
            self._sync.drop()
            return
        super().skip_step(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._sync is not None:
            self._sync.step()
            return
        if self.compressor is not None and self.world_size > 1:
            self.grads.reduce_gradients([p for g in optimizer.param_groups for p in g["params"]])
        super().step(optimizer)

    def peer_store_address(self) -> tuple[str, int, int | None] | None:
        """Horovod has no key-value store the workers can use: rank 0 hosts a TCPStore for the lost-worker
        heart-beats, reachable at :func:`advertised_address`."""
        if self.world_size == 1:
            return None
        where = None
        if self.rank == 0:
            import torch.distributed as dist

            self._watch_store = dist.TCPStore("0.0.0.0", 0, is_master=True, wait_for_workers=False)
            where = (advertised_address(os.environ), int(self._watch_store.port))
        host, port = self.hvd.broadcast_object(where, root_rank=0, name="datkit.peer_store")
        return host, port, 0

    def close(self) -> None:
        self.watch.stop()
        if getattr(self, "_alive", False):
            self._alive = False
            self.hvd.shutdown()


# Interfaces the launcher confines its traffic to: Open MPI's (``--mca btl_tcp_if_include``, passed on to the ranks
# as OMPI_MCA_*), horovodrun's (--network-interface -> HOROVOD_GLOO_IFACE under gloo), gloo's, NCCL's.
_IFACE_VARS = ("OMPI_MCA_btl_tcp_if_include", "HOROVOD_GLOO_IFACE", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def advertised_address(env: Mapping[str, str]) -> str:
    """Where the other workers reach a server of this (rank 0's) process: horovodrun's host name for it
    (``HOROVOD_HOSTNAME``, as given to ``-H``; gloo launches); under an MPI launcher, which sets no such name, the
    IPv4 address of the first interface the launcher's transport is confined to, else of this host's name (resolved
    here: the same name may resolve elsewhere on other hosts), else ``localhost``."""
    if env.get("HOROVOD_HOSTNAME"):
        return env["HOROVOD_HOSTNAME"]
    for var in _IFACE_VARS:
        for iface in env.get(var, "").split(","):
            addr = _interface_address(iface.strip())
            if addr:
                return addr
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "localhost"


def _interface_address(iface: str) -> str | None:
    """IPv4 address of network interface ``iface`` (None: no such interface, no address, or not a name)."""
    if not iface or "/" in iface or iface.startswith("^"):
        return None
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:  # SIOCGIFADDR
            raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", iface.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(raw[20:24])

