#!/usr/bin/env bash
# Quickstart 1: set up .venv and run the main job -- PGD adversarial training of a small CNN on the
# embedded offline MNIST data (mnist5k) with 2 workers on CPU (torchrun, gloo), ending with the
# results table in the DAT paper's columns (TA, RA, AA, C, T, bytes/iter). Extra arguments are passed on as
# config overrides (key=value). The autoattack extra (torchattacks) is installed for the AA column.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/setup_env.sh" autoattack
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m torch.distributed.run --standalone --nproc_per_node 2 -m datkit.train "$@"
