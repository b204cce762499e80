"""The distributed-training sections of the configuration schema: ``dist`` (torch.distributed / Horovod launch
options), ``deepspeed`` (ZeRO and DeepSpeed's own compressed optimizers) and ``compression`` (gradient quantization on
every backend). Part of :mod:`datkit.config.schema` (the root ``Config`` holds them); every field's comment is its
documentation in the generated config reference."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistConfig:
    """Process-group options of the torch backend (torchrun)."""

    timeout_s: int = 600  # collective timeout: a lost worker makes the others fail after this long
    peer_timeout_s: float = 30.0  # lost-worker watch: a peer whose heart-beat stops this long (or whose process is
    # gone) makes every worker exit with code 3 naming it; 0 = off
    ddp: bool = True  # wrap in DistributedDataParallel (gradient allreduce overlaps backward)
    bucket_cap_mb: float = 25.0  # DDP gradient bucket size


@dataclass
class DeepSpeedConfig:
    """Options of the deepspeed backend (ZeRO); batch sizes and gradient clipping come from train.*."""

    zero_stage: int = 0  # ZeRO stage: 0 (DDP-like) | 1 (optimizer states sharded) | 2 (+ gradients) | 3 (+ parameters)
    config_file: str = ""  # a DeepSpeed JSON merged over the generated config (its keys win, batch sizes excepted)
    offload_optimizer: str = "none"  # none | cpu: ZeRO-Offload of optimizer states (stage >= 1)
    offload_param: str = "none"  # none | cpu: parameter offload (stage 3)
    fp16: bool = False  # DeepSpeed fp16 mixed precision (GPU)
    bf16: bool = False  # DeepSpeed bf16 mixed precision (hardware with bf16 support)


@dataclass
class CompressionConfig:
    """Gradient compression (datkit.compress), on every backend; the DAT paper's Table 4 and 1-bit Adam."""

    name: str = "none"  # none (the backend's float32 allreduce) | fp16 | bf16 | int8 | onebit | your own: MODULE:CLASS
    # (a datkit.compress.Compressor subclass)
    two_sided: bool = False  # int8 only: quantize the server's average on the way back too ("8-bit 2-sided")
    rounding: str = "nearest"  # int8 only: nearest | stochastic (unbiased)
    block_size: int = 0  # int8 / onebit: elements per float32 scale; 0 = the compressor's default (int8 256, onebit
    # 1024)
    error_feedback: bool = True  # onebit only: keep worker- and server-side residuals (false = plain sign compression)
