#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install datkit into it, editable.
# Usage: source launchers/setup_env.sh [EXTRAS]     e.g. EXTRAS=dev  ->  pip install -e ".[dev]"
# Python >= 3.10 is taken from $PYTHON (default: python3). Re-running is cheap: pip skips what is there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "datkit: creating $ROOT/.venv with $($PYTHON --version)"
  "$PYTHON" -m venv "$ROOT/.venv"
fi
"$ROOT/.venv/bin/python" -m pip install --quiet --upgrade pip
SPEC="$ROOT"
[ -n "$EXTRAS" ] && SPEC="$ROOT[$EXTRAS]"
echo "datkit: installing datkit${EXTRAS:+[$EXTRAS]} into .venv (first time: torch + torchvision, a few minutes)"
"$ROOT/.venv/bin/python" -m pip install --quiet -e "$SPEC"
export PATH="$ROOT/.venv/bin:$PATH"
