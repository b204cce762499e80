"""datkit: distributed adversarial and certified robust training for PyTorch.

``datkit.fit(model, train_set, test_set, config=None, overrides=())`` trains your own model on your own data
(``datkit.api``); ``python -m datkit.train`` is the command line. Imported lazily: ``import datkit`` stays cheap.
"""
from __future__ import annotations

from typing import Any

__all__ = ["EXIT_PREEMPTED", "fit"]

# Exit codes of ``python -m datkit.train`` (every worker): 0 done; 2 start-up error (a bad key, value, plug-in or
# checkpoint: ``datkit.cli.fail``); 3 lost worker (``datkit.backends.peer_watch.LOST_WORKER_EXIT``); 4 non-finite
# loss/gradient (``datkit.engine.nonfinite.NONFINITE_EXIT``); 75 preempted: SIGUSR1/SIGTERM, a mid-epoch checkpoint
# was written -- requeue and resume with train.resume=true (``datkit.engine.preemption``, docs/preemption.md).
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): try again later


def __getattr__(name: str) -> Any:
    if name == "fit":
        from .api import fit

        return fit
    raise AttributeError(f"module 'datkit' has no attribute '{name}'")
