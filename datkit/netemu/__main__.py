"""``python -m datkit.netemu``: see :mod:`datkit.netemu.cli`."""
import sys

from datkit.netemu.cli import main

sys.exit(main())
