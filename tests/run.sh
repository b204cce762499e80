#!/usr/bin/env bash
# Quickstart 2: set up .venv with the test extras and run the whole test suite (CPU, a few minutes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/setup_env.sh" dev
# Horovod for the Horovod backend's tests: built from source for the venv's torch on the first run (minutes),
# then installed from the cached wheel. A failed build stops here (set -e): the tests are not run without it.
PYTHON="$ROOT/.venv/bin/python" bash "$ROOT/launchers/install_horovod.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
