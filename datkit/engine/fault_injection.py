"""TEST-ONLY fault injection, driven by environment variables (never set them in real runs).

They let the fault tests (``tests/test_faults*.py``) hit a failure at a known point:

- ``DATKIT_TEST_KILL_AT_STEP=R:E:S``: rank ``R`` sends itself SIGKILL just before step ``S`` (0-based) of
  epoch ``E``, in the first attempt of the job only (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a
  job restarted by ``torchrun --max-restarts`` runs through; ``DATKIT_TEST_KILL_SIGNAL=STOP`` freezes it
  instead (SIGSTOP: a hung worker, whose peers see no error, only a silent heart-beat);
- ``DATKIT_TEST_NAN_AT_STEP=R:E:S[,R:E:S...]``: rank ``R``'s loss (hence its gradients) becomes NaN at
  step ``S`` of epoch ``E``;
- ``DATKIT_TEST_GRAD_NAN_AT_STEP=R:E:S[,R:E:S...]``: the loss stays finite, but one element of rank ``R``'s
  local gradient of the model's first parameter becomes NaN in that step's backward pass: a tensor hook on the
  parameter, which autograd runs before the gradient is accumulated into ``.grad`` -- so before any
  gradient-accumulator hook (DDP's reducer and comm hook, Horovod's DistributedOptimizer), compressor or
  engine allreduce sees it. The hook removes itself after one call;
- ``DATKIT_TEST_SIGNAL_AT_STEP=R:E:S[,R:E:S...]``: rank ``R`` sends itself ``DATKIT_TEST_SIGNAL`` (default
  ``USR1``; ``TERM``) just before step ``S`` of epoch ``E``: a preemption signal on one rank only
  (``datkit.engine.preemption``; every worker then stops after step ``S``);
- ``DATKIT_TEST_HOLD_AT_STEP=R:E:S``: rank ``R`` waits just before step ``S`` of epoch ``E`` until the run gets a
  stop signal (SIGUSR1/SIGTERM; at most ``DATKIT_TEST_HOLD_TIMEOUT_S``, default 300 s), in a run that did not resume
  only: a job that is surely mid-epoch when a scheduler's signal comes, however fast the machine (the Slurm
  requeue tests wait for the time limit's signal this way);
- ``DATKIT_TEST_CHECKPOINT_WRITE_DELAY_S=X`` (read by ``datkit.checkpoint``): sleep ``X`` seconds between
  writing a checkpoint's temp file and renaming it over the previous checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

import torch

KILL_VAR = "DATKIT_TEST_KILL_AT_STEP"
NAN_VAR = "DATKIT_TEST_NAN_AT_STEP"
GRAD_NAN_VAR = "DATKIT_TEST_GRAD_NAN_AT_STEP"
SIGNAL_VAR = "DATKIT_TEST_SIGNAL_AT_STEP"
HOLD_VAR = "DATKIT_TEST_HOLD_AT_STEP"


def _points(var: str) -> set[tuple[int, int, int]]:
    value = os.environ.get(var, "").strip()
    if not value:
        return set()
    try:
        return {tuple(int(v) for v in item.split(":")) for item in value.split(",")}  # type: ignore[misc]
    except ValueError:
        raise ValueError(f"{var}={value!r}: expected RANK:EPOCH:STEP[,RANK:EPOCH:STEP...]") from None


def maybe_kill(rank: int, epoch: int, step: int) -> None:
    """SIGKILL this process at ``DATKIT_TEST_KILL_AT_STEP`` (first attempt only)."""
    if (rank, epoch, step) in _points(KILL_VAR) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        sig = getattr(signal, "SIG" + os.environ.get("DATKIT_TEST_KILL_SIGNAL", "KILL"))
        print(f"datkit-test: rank {rank} (pid {os.getpid()}) sends itself {sig.name} at epoch {epoch} step {step}",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), sig)


def maybe_signal(rank: int, epoch: int, step: int) -> None:
    """Send this process ``DATKIT_TEST_SIGNAL`` (default SIGUSR1) at ``DATKIT_TEST_SIGNAL_AT_STEP``."""
    if (rank, epoch, step) in _points(SIGNAL_VAR):
        sig = getattr(signal, "SIG" + os.environ.get("DATKIT_TEST_SIGNAL", "USR1"))
        print(f"datkit-test: rank {rank} (pid {os.getpid()}) sends itself {sig.name} at epoch {epoch} step {step}",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), sig)


def maybe_hold(rank: int, epoch: int, step: int, stop_signal: Callable[[], int], resumed: bool) -> None:
    """At ``DATKIT_TEST_HOLD_AT_STEP`` (a run that did not resume), wait until ``stop_signal()`` is non-zero."""
    if resumed or (rank, epoch, step) not in _points(HOLD_VAR):
        return
    print(f"datkit-test: rank {rank} holds at epoch {epoch} step {step} until a stop signal", file=sys.stderr,
          flush=True)
    deadline = time.monotonic() + float(os.environ.get("DATKIT_TEST_HOLD_TIMEOUT_S", "300"))
    while not stop_signal() and time.monotonic() < deadline:
        time.sleep(0.05)


def inject_nan(rank: int, epoch: int, step: int) -> bool:
    """True when ``DATKIT_TEST_NAN_AT_STEP`` asks this rank's loss to be NaN at this step."""
    return (rank, epoch, step) in _points(NAN_VAR)


def inject(loss: torch.Tensor, model: torch.nn.Module, rank: int, epoch: int, step: int) -> torch.Tensor:
    """The loss to back-propagate: NaN at ``DATKIT_TEST_NAN_AT_STEP``; at ``DATKIT_TEST_GRAD_NAN_AT_STEP`` the
    loss unchanged and a one-shot NaN hook on the gradient of ``model``'s first trainable parameter."""
    if inject_nan(rank, epoch, step):
        loss = loss * float("nan")
    if (rank, epoch, step) in _points(GRAD_NAN_VAR):
        poison_next_gradient(next(p for p in model.parameters() if p.requires_grad))
    return loss


def poison_next_gradient(param: torch.nn.Parameter) -> None:
    """Make element 0 of ``param``'s next local gradient NaN (the gradient as autograd computed it, before
    ``.grad`` and every reduction see it)."""
    def hook(grad: torch.Tensor) -> torch.Tensor:
        handle.remove()
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad

    handle = param.register_hook(hook)
