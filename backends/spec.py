"""What a backend's constructor reads of the run's configuration: one frozen ``BackendSpec``, built by ``backend_spec``.

Every backend takes the same ``BackendSpec`` (``TorchBackend(spec)``, ``HorovodBackend(spec)``,
``DeepSpeedBackend(spec)``); ``create_backend(cfg)`` builds it once from the omegaconf config. Its sections are the
schema's own dataclasses (``datkit.config.schema``), so ``spec.dist.timeout_s`` reads as ``cfg.dist.timeout_s`` does
(``deepspeed_config`` reads a spec and a whole config alike).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from datkit.config.schema import (
    CompressionConfig,
    DeepSpeedConfig,
    DistConfig,
    MethodConfig,
    OptimConfig,
    TrainConfig,
)


@dataclass(frozen=True)
class BackendSpec:
    """The configuration a backend is built from (defaults: the schema's, one worker on ``device``)."""

    device: str = "auto"  # auto | cpu | cuda (``device``)
    sync_bn: bool = False  # model.sync_bn: Horovod refuses it with more than one worker
    dist: DistConfig = field(default_factory=DistConfig)  # process group, DDP, buckets, lost-worker watch
    train: TrainConfig = field(default_factory=TrainConfig)  # grad_accum (Horovod); batch sizes, clipping (DeepSpeed)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # ZeRO (DeepSpeed only)
    compression: CompressionConfig = field(default_factory=CompressionConfig)  # what a ZeRO stage refuses
    optim: OptimConfig = field(default_factory=OptimConfig)  # (DeepSpeed: ``refuse_at_zero_stage``)
    method: MethodConfig = field(default_factory=MethodConfig)


def _section(node: Any) -> Any:
    """A config section as its schema dataclass (an omegaconf node is converted; a dataclass is kept)."""
    return OmegaConf.to_object(node) if isinstance(node, DictConfig) else node


def backend_spec(cfg: Any) -> BackendSpec:
    """The ``BackendSpec`` of a run's configuration ``cfg`` (``datkit.config.load_config``'s result)."""
    return BackendSpec(device=str(cfg.device), sync_bn=bool(cfg.model.sync_bn), dist=_section(cfg.dist),
                       train=_section(cfg.train), deepspeed=_section(cfg.deepspeed),
                       compression=_section(cfg.compression), optim=_section(cfg.optim), method=_section(cfg.method))
