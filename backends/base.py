"""The Backend interface: everything the trainer may ask of a communication backend.

Modelled on Lightning Fabric's strategies: a small abstract class; collectives are no-ops on one
process (torchtitan); a backend that cannot do something raises a clear error. Nothing outside
``datkit.backends`` branches on which backend is running.
"""
from __future__ import annotations

import contextlib
import os
import time
from abc import ABC, abstractmethod
from typing import Any, ContextManager, Iterator

import torch
from torch import nn

from datkit.checkpoint import (RESUME_KEY, atomic_save, check_backend, check_model_fits, load_checkpoint_file,
                              load_datkit_checkpoint, load_optimizer_state)
from datkit.compress import ByteCounter, Compressor, CountingCollectives, GradientBuckets, gather_state, pick_state

from .comm_timer import CommTimer


def _sum64(t: torch.Tensor) -> torch.Tensor:
    """The float64 sum of ``t``: non-finite exactly when an element is NaN/Inf (float32/16 values cannot
    overflow a float64 sum), in one pass without a temporary the size of ``t``."""
    return t.sum(dtype=torch.float64)


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run here (not implemented yet, or its library is not installed)."""


class Backend(ABC):
    """Rank/world size/device, joint set-up, gradient synchronisation, collectives, checkpoints.

    Collectives operate on tensors of this backend's ``device``:
    ``all_reduce(t, op)`` in place (op "sum" | "mean" | "max"), ``all_gather(t)`` -> tensor of shape
    ``(world_size, *t.shape)``, ``all_to_all(t)`` -> chunk ``j`` of dim 0 goes to rank ``j``,
    ``broadcast(t, src)`` in place, ``barrier()``.
    """

    name: str = "base"

    def __init__(self) -> None:
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0
        self.local_world_size = 1  # workers on this host (sets the CPU threads per worker)
        self.device = torch.device("cpu")
        self.comm_timer = CommTimer()
        self.byte_counter = ByteCounter()
        self.compressor: Compressor | None = None
        self.comm_optimizer: Any = None  # an optimizer that reduces over workers itself (datkit.optim.communicating)
        self.bucket_cap_mb = 25.0
        self._buckets: GradientBuckets | None = None
        self._watch: Any = None  # peer_watch.PeerWatch while started
        self._pre_nonfinite: torch.Tensor | None = None  # a NaN/Inf seen in local gradients before compression
        self._failed = False

    # --- identity -------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that prints and writes files."""
        return self.rank == 0

    def describe(self) -> str:
        """One line for the log: backend, world size, device."""
        return f"backend={self.name} world_size={self.world_size} device={self.device}"

    # --- model and gradients --------------------------------------------------------------------
    @abstractmethod
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Move/wrap the model and optimizer for training; returns (wrapped model, optimizer)."""

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain model under any wrapper: attacks and bounds run on it."""
        return getattr(model, "module", model)

    def no_sync(self, model: nn.Module) -> ContextManager[Any]:
        """Context for micro-batches whose gradients are accumulated locally (no communication)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass (gradient synchronisation happens here or in ``step``)."""
        loss.backward()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the (synchronised) gradient norm; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(self.unwrap(model).parameters(), max_norm))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step on synchronised gradients, then zero them."""
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # --- non-finite steps (train.nonfinite; datkit/engine/nonfinite.py) ---------------------------
    def note_gradients(self, flat: torch.Tensor) -> None:
        """Record whether this worker's local gradients ``flat`` hold a NaN/Inf, before they are compressed
        (no host synchronisation here; ``nonfinite_gradients`` reads the flag)."""
        bad = ~torch.isfinite(_sum64(flat))
        self._pre_nonfinite = bad if self._pre_nonfinite is None else self._pre_nonfinite | bad

    def gradients_averaged_in_backward(self) -> bool:
        """True when ``.grad`` already holds the averaged gradients after backward (DDP, Horovod's
        DistributedOptimizer, DeepSpeed's engine); False where they are reduced later, in ``step`` (the manual
        and compressed paths of Horovod/DeepSpeed, ``dist.ddp=false``) or never (one worker)."""
        return self.world_size > 1

    def nonfinite_gradients(self, model: nn.Module) -> tuple[bool, bool]:
        """After backward, before the step: (this worker's local gradients held a NaN/Inf -- noted before
        compression or reduction by ``note_gradients``, or read from ``.grad`` where it is still local --,
        the averaged gradients in ``.grad`` hold one -- the same on every worker). Resets the local flag."""
        sums = [_sum64(p.grad) for p in self.unwrap(model).parameters() if p.grad is not None]
        grad_bad = not bool(torch.isfinite(torch.stack(sums).sum())) if sums else False
        local = bool(self._pre_nonfinite) if self._pre_nonfinite is not None else False
        self._pre_nonfinite = None
        if not self.gradients_averaged_in_backward():
            return local or grad_bad, False
        return local, grad_bad

    def skip_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop this step's gradients without an optimizer step (``train.nonfinite=skip``)."""
        optimizer.zero_grad(set_to_none=True)
        self.drop_nonfinite_compression_state()

    def drop_nonfinite_compression_state(self) -> None:
        """Error-feedback residuals that absorbed a NaN/Inf restart from zero (else every later step would
        carry it: the residual is added to the next gradient)."""
        residuals = getattr(self.compressor, "residuals", None) or {}
        for side in residuals.values():
            for key, r in list(side.items()):
                if not bool(torch.isfinite(r).all()):
                    side[key] = torch.zeros_like(r)

    def comm_seconds(self) -> float:
        """Seconds of gradient communication since the last call (and reset the counter)."""
        return self.comm_timer.reset()

    def comm_bytes(self) -> float:
        """Bytes of gradient communication this worker sent since the last call (and reset the counter)."""
        return self.byte_counter.reset()

    # --- gradient compression -------------------------------------------------------------------
    def set_compressor(self, compressor: Compressor | None) -> None:
        """Reduce gradients with ``compressor`` (None: the backend's own float32 allreduce). Before ``setup``."""
        self.compressor = compressor
        if compressor is not None and self.world_size == 1 and self.is_main:
            print(f"datkit: compression {compressor.describe()} has no effect with 1 worker (nothing is communicated)",
                  flush=True)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> bool:
        """Called by ``setup``: an optimizer with ``communicates = True`` (1-bit Adam / LAMB) gets this backend's
        metered, timed collectives (``datkit.optim.communicating.Exchange``) and the gradients then stay local in
        backward and ``step`` (``gradients_stay_local``). Returns whether it communicates."""
        from datkit.optim.communicating import Exchange, communicates

        if not communicates(optimizer):
            return False
        optimizer.attach(Exchange(self.counting_collectives(), self.comm_timer))
        self.comm_optimizer = optimizer
        return True

    def gradients_stay_local(self) -> bool:
        """True when the optimizer does the reducing (``attach_optimizer``): no gradient averaging here."""
        return self.comm_optimizer is not None and self.world_size > 1

    def counting_collectives(self) -> CountingCollectives:
        """This backend's collectives, with every call's bytes added to ``byte_counter``."""
        return CountingCollectives(self, self.byte_counter)

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """Manual path: average gradients over workers in buckets, compressed if a compressor is set.

        For backends (or ``dist.ddp=false``) that do not synchronise gradients during backward. Timed (C)
        and counted (bytes). Every worker must call it with the same parameters.
        """
        if self.world_size == 1 or self.gradients_stay_local():
            return
        if self._buckets is None:
            self._buckets = GradientBuckets(params, self.bucket_cap_mb)
        coll, m, comp = self.counting_collectives(), self.world_size, self.compressor
        start = time.perf_counter()
        if comp is None:
            self._buckets.reduce(lambda flat, key: coll.all_reduce(flat.div_(m)))
        else:
            def reduce(flat: torch.Tensor, key: str) -> torch.Tensor:
                self.note_gradients(flat)  # a NaN would come back from the codes as finite garbage
                return comp.reduce_mean(flat, coll, key)

            self._buckets.reduce(reduce)
        self.comm_timer.record(start)

    def compression_state(self) -> dict[str, Any] | None:
        """Collective: every worker's compressor state (error-feedback residuals), for rank 0's checkpoint."""
        if self.compressor is None:
            return None
        return gather_state(self.compressor.local_state(), self)

    def load_compression_state(self, saved: dict[str, Any] | None) -> None:
        """Give this worker its part of a ``compression_state`` back (a different world size starts from zero)."""
        if self.compressor is None or saved is None:
            return
        mine = pick_state(saved, self.rank, self.world_size, self.device)
        if mine is None:
            if self.is_main:
                print(f"datkit: the checkpoint's compression state is for {saved.get('world_size')} workers, this run has "
                      f"{self.world_size}: error-feedback residuals start from zero", flush=True)
            return
        self.compressor.load_local_state(mine)

    def optimizer_exchange_state(self) -> dict[str, Any] | None:
        """Collective: every worker's state of a communicating optimizer's exchange (its error-feedback residuals)."""
        if self.comm_optimizer is None:
            return None
        return gather_state(self.comm_optimizer.exchange_state(), self)

    def load_optimizer_exchange_state(self, saved: dict[str, Any] | None) -> None:
        """Give this worker its part of an ``optimizer_exchange_state`` back (another world size starts from zero)."""
        mine = pick_state(saved, self.rank, self.world_size, self.device) if self.comm_optimizer is not None else None
        if mine is not None:
            self.comm_optimizer.load_exchange_state(mine)
        elif self.comm_optimizer is not None and saved is not None and self.is_main:
            print(f"datkit: the checkpoint's optimizer exchange state is for {saved.get('world_size')} workers, this run "
                  f"has {self.world_size}: the 1-bit error-feedback residuals start from zero", flush=True)

    # --- collectives ----------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(0)

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        return None

    # --- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, path: str, state: dict[str, Any]) -> None:
        """Rank 0 writes ``state`` atomically; every rank waits until it is on disk."""
        if self.is_main:
            atomic_save(state, path)
        self.barrier()

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Every rank loads ``path`` (``weights_only=True``) onto the CPU."""
        return load_checkpoint_file(path)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full (unsharded) weights of the model; collective on backends that shard parameters."""
        return self.unwrap(model).state_dict()

    def save_training_state(self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                            run_state: dict[str, Any]) -> None:
        """Collective: checkpoint model + optimizer with the trainer's ``run_state`` at ``path``.

        The file at ``path`` always holds ``model`` (full weights) and ``run_state``'s keys, so that
        evaluation tools read every backend's checkpoints alike; backends that shard optimizer state
        save it their own way next to it.
        """
        state = {**run_state, "model": self.model_state_dict(model), "optimizer": optimizer.state_dict()}
        self.save_checkpoint(path, state)

    def load_training_state(self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore what ``save_training_state`` wrote into ``model`` and ``optimizer``; returns the run state.

        The file is untrusted input (``datkit.checkpoint``): a weights-only load, checked to be a datkit training
        checkpoint of this backend's kind whose tensors fit this run's model and optimizer, else a one-line
        ``CheckpointError`` (exit code 2)."""
        state = load_datkit_checkpoint(path, RESUME_KEY, training=True)
        check_backend(state, self.name, path)
        check_model_fits(state["model"], self.unwrap(model), RESUME_KEY, path)
        self.unwrap(model).load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"], RESUME_KEY, path)
        return state

    # --- lost workers (backends/peer_watch.py) ------------------------------------------------
    def peer_store_address(self) -> tuple[str, int, int | None] | None:
        """(host, port, rank whose process hosts it -- None: the launcher's agent) of a TCPStore every worker
        reaches, for the lost-worker heart-beats; None = no watch. Default: the store of torch.distributed's
        env:// rendezvous (``MASTER_ADDR``/``MASTER_PORT``; torchrun's agent store, or rank 0's)."""
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if self.world_size == 1 or not addr or not port:
            return None
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        return addr, int(port), None if agent else 0

    def start_peer_watch(self, peer_timeout_s: float, startup_timeout_s: float) -> None:
        """Collective: start the heart-beat watch (``dist.peer_timeout_s``; 0 = off, as with one worker)."""
        where = self.peer_store_address() if peer_timeout_s > 0 and self.world_size > 1 else None
        if where is None:
            return
        from .elastic_group import restart_attempt
        from .peer_watch import PeerWatch, next_generation, store_client

        host, port, host_rank = where
        prefix = f"datkit/watch/{restart_attempt()}/{next_generation()}"
        self._watch = PeerWatch(lambda: store_client(host, port, prefix, max(peer_timeout_s, 5.0)), (host, port),
                                self.rank, self.world_size, peer_timeout_s, startup_timeout_s, host_rank)
        self._watch.install_sigterm_handler()

    @contextlib.contextmanager
    def fault_guard(self) -> Iterator[None]:
        """Around training: an exception that comes from a lost peer becomes the lost-worker message and
        exit code 3 (``peer_watch``); any other exception propagates."""
        try:
            yield
        except Exception as err:
            self._failed = True
            if self._watch is not None:
                self._watch.handle_failure(err, max_wait_s=5.0)
            raise
        self.stop_peer_watch()  # a clean finish

    def expect_exit(self) -> None:
        """Every worker agreed to stop after this step (SIGUSR1/SIGTERM, ``datkit.engine.preemption``): from now on
        a peer that exits, or the launcher whose store is gone (torchrun's agent killed by SIGUSR1), is no lost
        worker -- the lost-worker watch reports nothing more. A peer lost while the checkpoint is written still fails
        the checkpoint's collectives."""
        if self._watch is not None:
            self._watch.expect_exit()

    def stop_peer_watch(self) -> None:
        """Stop the heart-beats; after a clean run the peers are told this exit is not a loss."""
        if self._watch is not None:
            self._watch.stop(clean=not self._failed)
            self._watch = None

    def close(self) -> None:
        """Tear down the process group (idempotent)."""
        self.stop_peer_watch()
