"""``python -m datkit.certify [mode=NAME] checkpoint=PATH [key=value ...]``: certify a checkpoint.

``mode`` picks the certification method (default ``smoothing``: randomized smoothing, Cohen et al. 2019,
``datkit.certify.smoothing_run``); every other argument goes to that mode's entry point. A new mode is
one entry in :data:`MODES`: a module with ``main(argv) -> int`` and a ``USAGE`` string.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import import_module

from datkit.cli import fail
from datkit.config import ConfigError

# mode -> module with main(argv) and USAGE
MODES: dict[str, str] = {"smoothing": "datkit.certify.smoothing_run"}
DEFAULT_MODE = "smoothing"


def split_mode(argv: Sequence[str]) -> tuple[str, list[str]]:
    """(mode, the other arguments): ``mode=NAME`` anywhere on the command line, else the default."""
    mode, rest = DEFAULT_MODE, []
    for a in argv:
        if a.startswith("mode="):
            mode = a.split("=", 1)[1]
        else:
            rest.append(a)
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not one of: {', '.join(MODES)}")
    return mode, rest


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the mode's ``main``; 0 on success, 2 on a start-up error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        mode, rest = split_mode(argv)
    except ConfigError as err:
        fail(err)
    module = import_module(MODES[mode])
    if any(a in ("-h", "--help") for a in rest):
        print(f"modes (mode=NAME, default {DEFAULT_MODE}): {', '.join(MODES)}\n\n{module.USAGE}")
        return 0
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
