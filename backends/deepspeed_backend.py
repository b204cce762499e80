"""The ``deepspeed`` backend: ZeRO stages 0-3 through the DeepSpeed engine, launched by ``deepspeed``.

``deepspeed --num_gpus N datkit/train.py backend=deepspeed deepspeed.zero_stage=2`` (on CPU DeepSpeed
picks its CPU accelerator and gloo). The model and datkit's optimizer (a client optimizer: Adam, SGD,
LALR) go into ``deepspeed.initialize`` with a config built from datkit's (``backends.deepspeed_config``);
``backward``/``step`` go through the engine, collectives through ``deepspeed.comm``, checkpoints through
``engine.save_checkpoint``/``load_checkpoint`` (ZeRO shards saved and resumed), and attacks run on
``engine.module`` (an attack through the engine breaks its gradient bookkeeping).

Gradient compression: with ``compression.name`` set, the engine's own allreduce is switched off
(``enable_backward_allreduce = False``) and datkit's compressor reduces the gradients over
``deepspeed.comm`` before the engine's step -- at ZeRO stage 0 only, like DeepSpeed's former 1-bit Adam:
ZeRO >= 1 partitions gradients inside its own reduce-scatter, which a compressor cannot replace.
"""
from __future__ import annotations

import datetime
import os
import shutil
import socket
from typing import Any

import torch
from torch import nn

from datkit.checkpoint import (RESUME_KEY, CheckpointError, check_backend, check_deepspeed_shards, check_model_fits,
                              deepspeed_folder, load_datkit_checkpoint, load_deepspeed_shard)

from .base import Backend
from .elastic_group import init_group_for_attempt, restart_attempt
from .p2p_exchange import p2p_all_gather, p2p_all_to_all, use_p2p_exchange
from .deepspeed_comm import CommMeter, unlink_shm_buffer
from .deepspeed_config import build_ds_config, refuse_at_zero_stage

_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeepSpeedBackend(Backend):
    """DeepSpeed backend (see module docstring)."""

    name = "deepspeed"

    def __init__(self, cfg) -> None:
        super().__init__()
        import deepspeed
        import deepspeed.comm as ds_comm

        self._ds, self._comm, self.cfg = deepspeed, ds_comm, cfg
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but no CUDA device is available (use device=cpu or auto)")
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(k, v)  # a plain `python -m datkit.train backend=deepspeed` is one worker
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        timeout = datetime.timedelta(seconds=cfg.dist.timeout_s)
        if restart_attempt() > 0 and not torch.distributed.is_initialized():
            # restarted by torchrun --max-restarts: the dead attempt's gloo keys are still in torchrun's store;
            # start the group under this attempt's own prefix, DeepSpeed adopts an initialized group
            init_group_for_attempt("nccl" if want_cuda else "gloo", timeout)
        deepspeed.init_distributed(dist_backend="nccl" if want_cuda else "gloo", verbose=False, timeout=timeout)
        self.rank, self.world_size = ds_comm.get_rank(), ds_comm.get_world_size()
        unlink_shm_buffer(ds_comm, self.rank)
        self._p2p_exchange = self.world_size > 1 and use_p2p_exchange()  # deepspeed.comm runs on torch.distributed
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_world_size = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
        if want_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        self.ds_config = build_ds_config(cfg, self.world_size, on_gpu=want_cuda)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        refuse_at_zero_stage(cfg, self.zero_stage)
        self.engine = None
        self.meter = CommMeter(self.comm_timer, self.byte_counter, self.world_size)

    def describe(self) -> str:
        return super().describe() + f" zero_stage={self.zero_stage}"

    # --- model and gradients --------------------------------------------------------------------
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = model.to(self.device)
        self.engine, _, _, _ = self._ds.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        if self.attach_optimizer(optimizer) or self.compressor is not None:  # datkit reduces, in ``step``
            self.engine.enable_backward_allreduce = False  # (and meters its own collectives)
        else:
            self.meter.install()
            self.meter.always = self.zero_stage == 3  # parameter gathers in every forward / backward (attacks too)
            if self.world_size > 1 and self.zero_stage == 0:  # the engine allreduces .grad after backward
                for p in self.engine.module.parameters():
                    if p.requires_grad:  # this worker's NaN/Inf, before the average hides whose it was
                        p.register_post_accumulate_grad_hook(lambda q: self.note_gradients(q.grad))
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

    def gradients_averaged_in_backward(self) -> bool:  # datkit's compressors and communicating optimizers reduce in ``step``
        return self.world_size > 1 and self.compressor is None and not self.gradients_stay_local()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """DeepSpeed clips inside ``step`` (``gradient_clipping`` = ``train.grad_clip``)."""
        return float("nan")

    def skip_step(self, optimizer: torch.optim.Optimizer) -> None:
        """ZeRO-0: drop the gradients; the engine's counters advance as its own skipped (overflow) steps do."""
        self.engine.zero_grad()
        self.drop_nonfinite_compression_state()
        self.engine.micro_steps += 1
        self.engine.global_steps += 1
        self.engine.skipped_steps += 1

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.compressor is not None and self.world_size > 1:
            self.reduce_gradients(list(self.engine.module.parameters()))
        self.meter.active = True
        try:
            self.engine.step()
        finally:
            self.meter.active = False

    # --- collectives (deepspeed.comm) -----------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        if op == "mean":
            self._comm.all_reduce(tensor)
            return tensor.div_(self.world_size)
        self._comm.all_reduce(tensor, op=getattr(self._comm.ReduceOp, _OPS[op]))
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        if self._p2p_exchange:
            return p2p_all_gather(tensor, self.rank, self.world_size)
        out = torch.empty(self.world_size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        self._comm.all_gather_into_tensor(out, tensor.contiguous().reshape(-1))
        return out.view(self.world_size, *tensor.shape)

    def all_to_all(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        if self._p2p_exchange:
            return p2p_all_to_all(tensor, self.rank, self.world_size)
        out = torch.empty_like(tensor)
        self._comm.all_to_all_single(out, tensor.contiguous())
        return out

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            self._comm.broadcast(tensor, src)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            self._comm.barrier()

    # --- checkpoints ----------------------------------------------------------------------------
    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full weights; at ZeRO-3 the partitioned parameters are gathered first (collective)."""
        module = self.unwrap(model)
        if self.zero_stage == 3:
            with self._ds.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def save_training_state(self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                            run_state: dict[str, Any]) -> None:
        """ZeRO shards via ``engine.save_checkpoint`` into ``<path>.deepspeed/<tag>``, then rank 0 writes
        ``path`` (full weights + run state + the tag) atomically, then older tags are removed."""
        mid = run_state.get("mid_epoch")  # a mid-epoch checkpoint: a tag of its own, the epoch's stays until replaced
        ds_dir, tag = path + ".deepspeed", (f"epoch{run_state['epoch']}" if mid is None else
                                             f"epoch{mid['epoch']}_step{mid['next_step']}")
        self.engine.save_checkpoint(ds_dir, tag=tag)
        state = {**run_state, "model": self.model_state_dict(model), "deepspeed_dir": os.path.basename(ds_dir),
                 "deepspeed_tag": tag, "zero_stage": self.zero_stage}
        self.save_checkpoint(path, state)
        if self.is_main:
            for old in os.listdir(ds_dir):
                if old != tag and old.startswith("epoch") and os.path.isdir(os.path.join(ds_dir, old)):
                    shutil.rmtree(os.path.join(ds_dir, old), ignore_errors=True)

    def load_training_state(self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The datkit file as on every backend (``datkit.checkpoint``: weights only, a DeepSpeed training checkpoint,
        weights that fit), then its shard folder: ``deepspeed_dir``/``deepspeed_tag`` plain names inside
        ``train.output_dir``, every shard file pickling only DeepSpeed's allow-listed classes; DeepSpeed's own
        loads of the shards then run with ``weights_only=True`` too (``load_deepspeed_shard``). At ZeRO >= 1 the
        optimizer state is partitioned per worker, so a checkpoint of another worker count is refused (ZeRO-0's
        state is whole: it resumes on any number of workers, like the torch and Horovod backends)."""
        state = load_datkit_checkpoint(path, RESUME_KEY, training=True)
        check_backend(state, self.name, path)
        check_model_fits(state["model"], self.unwrap(model), RESUME_KEY, path)
        saved_world = state.get("world_size")
        if self.zero_stage >= 1 and isinstance(saved_world, int) and saved_world != self.world_size:
            raise CheckpointError(RESUME_KEY, path, f"written by {saved_world} workers at ZeRO-{self.zero_stage}, "
                                  f"whose optimizer state is sharded per worker: resume it with {saved_world} workers "
                                  f"(this run has {self.world_size}), or start a new train.output_dir",
                                  shown=f"true ({path})")
        ds_dir, tag = deepspeed_folder(state, path)
        check_deepspeed_shards(ds_dir, tag, path)
        ckpt_engine = self.engine.checkpoint_engine
        ckpt_engine.load = lambda f, map_location=None: load_deepspeed_shard(f, map_location)  # this instance only
        try:
            loaded, _ = self.engine.load_checkpoint(ds_dir, tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        except (KeyError, ValueError, TypeError, AssertionError) as err:  # shards that do not fit this engine
            raise CheckpointError(RESUME_KEY, path, f"DeepSpeed cannot resume from {state['deepspeed_dir']}/{tag}: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
                                  shown=f"true ({path})") from None
        finally:
            del ckpt_engine.load  # back to the class's method (used by save_checkpoint's engine too)
        if loaded is None:
            raise CheckpointError(RESUME_KEY, path, f"DeepSpeed could not load its shards "
                                  f"{state['deepspeed_dir']}/{tag}", shown=f"true ({path})")
        return state

    def close(self) -> None:
        self.stop_peer_watch()
        self.meter.uninstall()
        if self._comm.is_initialized():
            self._comm.destroy_process_group()
