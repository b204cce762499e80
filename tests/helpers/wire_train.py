"""Several ``datkit.train`` runs in ONE launch (torchrun or ``deepspeed --no_local_rank``), socket writes recorded.

``python wire_train.py RUNS_JSON``: ``RUNS_JSON`` maps a run's name to its ``datkit.train`` arguments; the runs go
in order, each through ``datkit.train.main``, with ``helpers/wire.py`` recording every epoch's socket writes next
to its ``bytes_per_iter`` (``$DATKIT_TEST_WIRE_DIR``). The process group stays up between the runs (the backends'
``close`` keeps it; the last run's workers end with it): one start-up of the workers for all of them.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wire


def _keep_group(cls) -> None:
    def close(self) -> None:
        self.stop_peer_watch()
        meter = getattr(self, "meter", None)
        if meter is not None:
            meter.uninstall()
        self.barrier()

    cls.close = close


def main() -> None:
    runs: dict[str, list[str]] = json.loads(sys.argv[1])
    wire.install()
    from datkit.backends.torch_dist import TorchBackend
    from datkit.train import main as train_main

    _keep_group(TorchBackend)
    try:
        from datkit.backends.deepspeed_backend import DeepSpeedBackend
    except ImportError:
        pass
    else:
        _keep_group(DeepSpeedBackend)
    for name, args in runs.items():
        os.environ["DATKIT_TEST_WIRE_RUN"] = name
        if os.environ.get("RANK", "0") == "0":
            print(f"=== run {name}", flush=True)
        train_main(args)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
