#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install datkit into it, editable.
# Usage: source launchers/setup_env.sh [EXTRAS]     e.g. EXTRAS=dev  ->  pip install -e ".[dev]"
# (EXTRAS containing horovod also runs launchers/install_horovod.sh: Horovod is not installable by pip.)
# Python >= 3.10 is taken from $PYTHON (default: python3). Re-running is cheap: once an install with the
# same extras succeeded (stamp file .venv/.datkit-installed-<extras>, newer than pyproject.toml), pip is
# not run again. DATKIT_REINSTALL=1 forces the install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
EXTRAS="${1:-}"
STAMP="$ROOT/.venv/.datkit-installed-${EXTRAS:-base}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  echo "datkit: creating $ROOT/.venv with $($PYTHON --version)"
  "$PYTHON" -m venv "$ROOT/.venv"
fi
up_to_date() {  # a stamp for these extras (or, for the base install, any stamp) newer than pyproject.toml
  local s
  for s in "$STAMP" $([ -z "$EXTRAS" ] && ls "$ROOT"/.venv/.datkit-installed-* 2>/dev/null); do
    [ -f "$s" ] && [ "$s" -nt "$ROOT/pyproject.toml" ] && return 0
  done
  return 1
}
if [ "${DATKIT_REINSTALL:-0}" = 1 ] || ! up_to_date; then
  "$ROOT/.venv/bin/python" -m pip install --quiet --upgrade pip
  SPEC="$ROOT"
  [ -n "$EXTRAS" ] && SPEC="$ROOT[$EXTRAS]"
  echo "datkit: installing datkit${EXTRAS:+[$EXTRAS]} into .venv (first time: torch + torchvision, a few minutes)"
  "$ROOT/.venv/bin/python" -m pip install --quiet -e "$SPEC"
  touch "$STAMP"
fi
case ",$EXTRAS," in  # the horovod extra: Horovod is built from source for the venv's torch (cached, idempotent)
  *,horovod,*) PYTHON="$ROOT/.venv/bin/python" bash "$ROOT/launchers/install_horovod.sh" ;;
esac
export PATH="$ROOT/.venv/bin:$PATH"
