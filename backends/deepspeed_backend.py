"""The ``deepspeed`` backend: ZeRO stages 0-3 through the DeepSpeed engine, launched by ``deepspeed``.

``deepspeed --num_gpus N datkit/train.py backend=deepspeed deepspeed.zero_stage=2`` (on CPU DeepSpeed
picks its CPU accelerator and gloo). The model and datkit's optimizer (a client optimizer: Adam, SGD,
LALR) go into ``deepspeed.initialize`` with a config built from datkit's (``backends.deepspeed_config``);
``backward``/``step`` go through the engine, collectives through ``deepspeed.comm`` (``collectives.DistCollectives``,
the torch backend's class over DeepSpeed's module), checkpoints through ``engine.save_checkpoint``/``load_checkpoint``
(``deepspeed_checkpoint``: ZeRO shards saved and resumed), and attacks run on ``engine.module`` (an attack through the
engine breaks its gradient bookkeeping).

Gradient compression: with ``compression.name`` set, the engine's own allreduce is switched off
(``enable_backward_allreduce = False``) and datkit's compressor reduces the gradients over
``deepspeed.comm`` before the engine's step -- at ZeRO stage 0 only, like DeepSpeed's former 1-bit Adam:
ZeRO >= 1 partitions gradients inside its own reduce-scatter, which a compressor cannot replace.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch
from torch import nn

from .base import Backend
from .collectives import DistCollectives
from .deepspeed_checkpoint import DeepSpeedCheckpointIO
from .deepspeed_comm import CommMeter, unlink_shm_buffer
from .deepspeed_config import build_ds_config, refuse_at_zero_stage
from .device import bind_device, wants_cuda
from .elastic_group import init_group_for_attempt, restart_attempt
from .p2p_exchange import use_p2p_exchange
from .spec import BackendSpec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeepSpeedBackend(Backend):
    """DeepSpeed backend (see module docstring)."""

    name = "deepspeed"

    def __init__(self, spec: BackendSpec) -> None:
        import deepspeed
        import deepspeed.comm as ds_comm

        self._ds, self._comm, self.spec = deepspeed, ds_comm, spec
        want_cuda = wants_cuda(spec.device)
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)  # a plain `python -m datkit.train backend=deepspeed` is one worker
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        timeout = datetime.timedelta(seconds=spec.dist.timeout_s)
        if restart_attempt() > 0 and not torch.distributed.is_initialized():
            # restarted by torchrun --max-restarts: the dead attempt's gloo keys are still in torchrun's store;
            # start the group under this attempt's own prefix, DeepSpeed adopts an initialized group
            init_group_for_attempt("nccl" if want_cuda else "gloo", timeout)
        deepspeed.init_distributed(dist_backend="nccl" if want_cuda else "gloo", verbose=False, timeout=timeout)
        rank, world_size = ds_comm.get_rank(), ds_comm.get_world_size()
        unlink_shm_buffer(ds_comm, rank)
        p2p = world_size > 1 and use_p2p_exchange()  # deepspeed.comm runs on torch.distributed
        collectives = DistCollectives(ds_comm, rank, world_size, p2p=p2p)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
        device = bind_device(want_cuda, local_rank)
        self.ds_config = build_ds_config(spec, world_size, on_gpu=want_cuda)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        refuse_at_zero_stage(spec, self.zero_stage)
        self.engine = None
        checkpoint_io = DeepSpeedCheckpointIO(collectives, deepspeed, self.zero_stage, lambda: self.engine)
        super().__init__(collectives, device, local_rank, local_world_size, checkpoint_io=checkpoint_io)
        self.meter = CommMeter(self.grads.comm_timer, self.grads.byte_counter, self.world_size)

    def describe(self) -> str:
        return super().describe() + f" zero_stage={self.zero_stage}"

    # --- model and gradients --------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = model.to(self.device)
        self.engine, _, _, _ = self._ds.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        if self.grads.attach_optimizer(optimizer) or self.compressor is not None:  # datkit reduces, in ``step``
            self.engine.enable_backward_allreduce = False  # (and meters its own collectives)
        else:
            self.meter.install()
            self.meter.always = self.zero_stage == 3  # parameter gathers in every forward / backward (attacks too)
            if self.world_size > 1 and self.zero_stage == 0:  # the engine allreduces .grad after backward
                for p in self.engine.module.parameters():
                    if p.requires_grad:  # this worker's NaN/Inf, before the average hides whose it was
                        p.register_post_accumulate_grad_hook(lambda q: self.grads.note_gradients(q.grad))
        # The client optimizer's param_groups are the ones DeepSpeed steps with: datkit's lr schedule sets them.
        return self.engine, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.engine.module if self.engine is not None and model is self.engine else super().unwrap(model)

    def backward(self, loss: torch.Tensor) -> None:
        """Engine backward; between accumulation boundaries the engine's micro-step counter advances."""
        self.meter.active = True
        try:
            self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already divided by train.grad_accum
            if not self.engine.is_gradient_accumulation_boundary():
                self.engine.step()
        finally:
            self.meter.active = False

    def gradients_averaged_in_backward(self) -> bool:
        # datkit's compressors and communicating optimizers reduce in ``step``
        return self.world_size > 1 and self.compressor is None and not self.grads.gradients_stay_local()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """DeepSpeed clips inside ``step`` (``gradient_clipping`` = ``train.grad_clip``)."""
        return float("nan")

    def skip_step(self, optimizer: torch.optim.Optimizer) -> None:
        """ZeRO-0: drop the gradients; the engine's counters advance as its own skipped (overflow) steps do."""
        self.engine.zero_grad()
        self.grads.drop_nonfinite_compression_state()
        self.engine.micro_steps += 1
        self.engine.global_steps += 1
        self.engine.skipped_steps += 1

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.compressor is not None and self.world_size > 1:
            self.grads.reduce_gradients(list(self.engine.module.parameters()))
        self.meter.active = True
        try:
            self.engine.step()
        finally:
            self.meter.active = False

    def close(self) -> None:
        self.watch.stop()
        self.meter.uninstall()
        if self._comm.is_initialized():
            self._comm.destroy_process_group()
