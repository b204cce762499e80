#!/usr/bin/env python3
"""Emulated multi-node runs on one machine (root): ``launchers/emulated_hosts.py up|down|run|probe ...``.

Same as ``python -m datkit.netemu``; see docs/emulated_hosts.md.
  sudo launchers/emulated_hosts.py run --hosts 2 --rate 100mbit --backend torch -- train.epochs=1
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from datkit.netemu.cli import main

if __name__ == "__main__":
    sys.exit(main())
