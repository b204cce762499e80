"""Entry point: parse config -> validate -> build backend -> train -> close.

Runs as ``python -m datkit.train``, under ``torchrun``, and as a script ``python datkit/train.py``
(the form DeepSpeed's launcher uses); accepts the ``--local_rank`` argument launchers append.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make `datkit` importable, not its sub-folders
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.path.insert(0, _root)

# torch, the backends and the plug-ins are imported by ``train``: a key, type or YAML error under a launcher is
# reported by every worker in a fraction of a second, without importing torch.
from datkit.cli import fail as cli_fail
from datkit.cli import parse_args
from datkit.config import ConfigError, load_config, validate_for_training, validate_for_world


def main(argv: list[str] | None = None) -> dict:
    """Train with the configuration given on the command line; returns the final results record."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        config_path, overrides = parse_args(argv)
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        cli_fail(err)
    return train(cfg, argv)


def train(cfg, argv: Sequence[str] = (), *, model=None, train_set=None, test_set=None,
          exit_on_error: bool = True) -> dict:
    """Check ``cfg``, build the backend and the run, train; returns the final results record (``datkit.train`` and
    ``datkit.fit`` share this function). A bad configuration or plug-in is found before any worker trains: with
    ``exit_on_error`` the process ends with exit code 2 and one line naming the key (rank 0 prints it), otherwise the
    ``ConfigError`` is raised. A lost worker ends the process with code 3. SIGUSR1/SIGTERM during training stop every
    worker after the same step with a mid-epoch checkpoint and raise ``datkit.engine.preemption.Preempted`` (a
    ``SystemExit`` with code 75, ``datkit.EXIT_PREEMPTED``); the signal handlers found are restored when training
    ends (docs/preemption.md)."""
    from datkit.backends import BackendUnavailable, create_backend
    from datkit.preflight import validate_config

    def fail(err: BaseException) -> None:
        if not exit_on_error:
            raise err
        cli_fail(err)

    try:
        validate_config(cfg, data=train_set is None)
        validate_for_training(cfg)
        backend = create_backend(cfg, argv)
    except (ConfigError, BackendUnavailable) as err:
        fail(err)
    try:
        try:
            validate_for_world(cfg, backend.world_size)
        except ConfigError as err:
            fail(err)
        from datkit.engine import Trainer, build_run

        with backend.fault_guard():  # a lost worker: "datkit: lost worker rank R ...", exit code 3
            try:
                run = build_run(cfg, backend, model=model, train_set=train_set, test_set=test_set)
                trainer = Trainer(run)
            except ConfigError as err:  # found while building the run: a plug-in's own check, a bad user model / data
                fail(err)
            return trainer.train()
    finally:
        backend.close()


def exit_after_run(final: dict) -> None:
    """End a finished multi-worker run with ``os._exit(0)`` once stdout/stderr are flushed.

    By then the backend is closed (process group destroyed, heart-beat thread joined, results and checkpoints
    written). What is left is the interpreter's own finalization, in which the C++ destructors of gloo /
    TCPStore objects aborted a finished worker once (``terminate called without an active exception``, exit -6,
    in a torchrun-restarted attempt; 1 of about 20 runs), failing a run that had completed."""
    if int(final.get("world_size", 1)) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def exit_now_under_a_launcher(exit_: SystemExit) -> None:
    """A worker that stops (start-up error: 2; non-finite values: 4; preempted: 75, also a single process) ends with
    ``os._exit`` once stdout/stderr are flushed (the backend is closed by then; a flush into a pipe whose launcher
    is gone is skipped, so that the code stays 75): a launcher stops the others as soon as one worker exits, and
    a worker still in the interpreter's finalization then dies of its SIGTERM (horovodrun: exit 143 for a
    worker that had decided on 4)."""
    from datkit import EXIT_PREEMPTED

    launched = int(os.environ.get("WORLD_SIZE", os.environ.get("HOROVOD_SIZE", "1"))) > 1
    if isinstance(exit_.code, int) and (launched or exit_.code == EXIT_PREEMPTED):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass  # a pipe to a launcher that is gone (a preemption signal killed it): exit with the code anyway
        os._exit(exit_.code)


if __name__ == "__main__":
    try:
        final = main()
    except SystemExit as exit_:
        exit_now_under_a_launcher(exit_)
        raise
    exit_after_run(final)
