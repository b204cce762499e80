#!/usr/bin/env bash
# Quickstart 2: set up .venv with the test extras and run the whole test suite (CPU, a few minutes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/setup_env.sh" dev
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
