"""Run ``datkit.train`` (its arguments as given, e.g. ``--local_rank=N`` from DeepSpeed's launcher) and write this
worker's exit code to ``$DATKIT_TEST_EXIT_LOG/<rank>`` -- the code the process ends with, as ``SystemExit`` or
``os._exit`` (the lost-worker path) gives it; a worker killed by a signal writes nothing.

The launchers do not all report every worker's code (DeepSpeed's reports only the first failure it polls, then
SIGTERMs the others), so the fault tests start the workers through this script to assert every worker's code.
"""
from __future__ import annotations

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from datkit.cli import launcher_rank  # noqa: E402


def record(code: object) -> None:
    code = 0 if code is None else code if isinstance(code, int) else 1  # SystemExit("message") exits with 1
    path = os.path.join(os.environ["DATKIT_TEST_EXIT_LOG"], launcher_rank())
    with open(path, "w") as f:
        f.write(str(code))


_os_exit = os._exit


def _recording_exit(code: int) -> None:
    record(code)
    _os_exit(code)


os._exit = _recording_exit  # type: ignore[assignment]
try:
    runpy.run_module("datkit.train", run_name="__main__", alter_sys=True)
except SystemExit as exit_:
    record(exit_.code)
    raise
except BaseException:
    record(1)
    raise
record(0)
