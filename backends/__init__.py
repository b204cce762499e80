"""Communication backends behind one interface (installed as ``datkit.backends``).

``create_backend(cfg)`` builds the backend named by ``cfg.backend`` (``auto`` picks from the
launcher's environment) from ``backend_spec(cfg)``, the same typed slice of the config for every backend.
Horovod and DeepSpeed are imported lazily, only when chosen. ``base`` says which parts a backend is made of.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from datkit.registry import Registry

from .base import Backend, BackendUnavailable
from .comm_timer import CommTimer
from .select import detect_backend
from .spec import BackendSpec, backend_spec

BACKENDS: Registry[Callable[[BackendSpec], Backend]] = Registry("backend")
BACKEND_CHOICES = ("auto", "torch", "horovod", "deepspeed")


@BACKENDS.register("torch")
def _torch(spec: BackendSpec) -> Backend:
    from .torch_dist import TorchBackend

    return TorchBackend(spec)


HOROVOD_INSTALL = "bash launchers/install_horovod.sh"  # from the repository root; PYTHON=... picks the interpreter


@BACKENDS.register("horovod")
def _horovod(spec: BackendSpec) -> Backend:
    try:
        import horovod.torch  # noqa: F401  (also fails when Horovod was built for another torch)
    except ImportError as err:
        raise BackendUnavailable(
            f"backend 'horovod' is not available: it needs Horovod, which is not installed or not usable here ({err}). "
            f"Install it with `PYTHON={sys.executable} {HOROVOD_INSTALL}` (it builds Horovod 0.28.1 for the "
            "installed torch and caches the wheel; a plain `pip install horovod` fails to build against torch >= 2.1), "
            "or use backend=torch (torchrun).") from None
    from .horovod_backend import HorovodBackend

    return HorovodBackend(spec)


@BACKENDS.register("deepspeed")
def _deepspeed(spec: BackendSpec) -> Backend:
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise BackendUnavailable(
            f"backend 'deepspeed' needs DeepSpeed, which is not installed ({err}). Install it with "
            "`pip install -e '.[deepspeed]'` (or `pip install deepspeed`), or use backend=torch (torchrun).") from None
    from .deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend(spec)


def resolve_backend_name(name: str, argv: Sequence[str] = ()) -> str:
    """``auto`` -> the launcher's backend; other names are returned as they are."""
    return detect_backend(argv=argv) if name == "auto" else name


def backend_config_errors(cfg) -> list[str]:
    """Errors in ``backend`` and the backends' own sections (``deepspeed.*``), and what the ZeRO stage of
    ``backend: deepspeed`` cannot carry; what depends on the number of workers is checked when the backend is built."""
    from datkit.config import choices

    from .deepspeed_config import deepspeed_config_errors, zero_stage_errors

    errors: list[str] = []
    choices(errors, "backend", cfg.backend, BACKEND_CHOICES)
    return errors + deepspeed_config_errors(cfg) + zero_stage_errors(cfg)


def create_backend(cfg, argv: Sequence[str] = ()) -> Backend:
    """Build the backend for ``cfg`` (``cfg.backend``, ``cfg.device``, ``cfg.dist``, ``cfg.compression``)."""
    from datkit.compress import compressor_from_config
    from datkit.config import raise_errors

    raise_errors(backend_config_errors(cfg))  # the backends check their own sections when one is built
    backend = BACKENDS.get(resolve_backend_name(cfg.backend, argv))(backend_spec(cfg))
    backend.set_compressor(compressor_from_config(cfg.compression, seed=cfg.train.seed))
    backend.start_peer_watch(cfg.dist.peer_timeout_s, cfg.dist.timeout_s)
    return backend


__all__ = ["Backend", "BACKENDS", "BACKEND_CHOICES", "backend_config_errors", "BackendSpec", "BackendUnavailable",
           "CommTimer", "backend_spec", "create_backend", "detect_backend", "resolve_backend_name"]
