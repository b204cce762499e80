"""``python -m datkit.bench SUBCOMMAND [options]``: dispatch to a benchmark of :data:`SUBCOMMANDS`."""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from datkit.bench import SUBCOMMANDS


def usage() -> str:
    """The top-level help: the subcommands and their summaries."""
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: python -m datkit.bench SUBCOMMAND [options]   (SUBCOMMAND --help for its options)", "",
             "subcommands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the subcommand named by ``argv[0]`` with the remaining arguments; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"datkit.bench: error: unknown subcommand '{name}'; known: {', '.join(SUBCOMMANDS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
