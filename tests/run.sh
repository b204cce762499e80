#!/usr/bin/env bash
# Quickstart 2: set up .venv with the test extras and run the whole test suite (CPU; on a fresh 2-core machine about
# 30 minutes in all: ~9.5 for the set-up with Horovod's build, ~20 of pytest; see docs/testing.md).
# pytest runs on DATKIT_TEST_WORKERS pytest-xdist workers (default 2; 0 = no xdist), one test file per worker at a
# time. Extra arguments go to pytest, e.g. `bash tests/run.sh tests/test_config.py -k cli`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launchers/setup_env.sh" dev
# Slurm, munge and Open MPI (Debian packages; root) for the Slurm-cluster and MPI tests, before Horovod's build so that
# it includes MPI. Not root / no apt-get: a message, and those tests skip saying why.
bash "$ROOT/launchers/install_cluster_tools.sh" || true
# Horovod for the Horovod backend's tests: built from source for the venv's torch on the first run (minutes),
# then installed from the cached wheel. A failed build stops here (set -e): the tests are not run without it.
PYTHON="$ROOT/.venv/bin/python" bash "$ROOT/launchers/install_horovod.sh"
# The docs site's build tools in their own venv, .venv-docs (docs/requirements.txt says why not in .venv):
# tests/test_docs.py runs `mkdocs build --strict` with it. Re-running is cheap: pip runs again only when
# docs/requirements.txt is newer than the stamp. A failed install stops here (set -e), like Horovod's build.
if [ ! -x "$ROOT/.venv-docs/bin/python" ]; then
  echo "datkit: creating $ROOT/.venv-docs (mkdocs, Material, mkdocstrings) with $($PYTHON --version)"
  "$PYTHON" -m venv "$ROOT/.venv-docs"
fi
if [ ! "$ROOT/.venv-docs/.installed" -nt "$ROOT/docs/requirements.txt" ]; then
  "$ROOT/.venv-docs/bin/python" -m pip install --quiet -r "$ROOT/docs/requirements.txt"
  touch "$ROOT/.venv-docs/.installed"
fi
cd "$ROOT"
WORKERS="${DATKIT_TEST_WORKERS:-2}"
if [ "$WORKERS" = 0 ]; then
  exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
fi
exec "$ROOT/.venv/bin/python" -m pytest -q -n "$WORKERS" --dist loadfile "$@"
