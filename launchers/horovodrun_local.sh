#!/usr/bin/env bash
# Horovod on one host: N workers (one GPU each when there are GPUs, else N CPU processes), gloo controller.
# Usage: launchers/horovodrun_local.sh N [key=value ...]
#   e.g. launchers/horovodrun_local.sh 2 compression.name=int8 compression.two_sided=true
# Needs Horovod (bash launchers/install_horovod.sh). PYTHON picks the interpreter (default: the repo's .venv,
# else python3); HVD_CONTROLLER=mpi uses MPI instead of gloo when Horovod was built with it.
# horovodrun sets no OMP_NUM_THREADS: datkit gives each CPU worker cores / N threads (train.threads).
set -euo pipefail
N="${1:?usage: horovodrun_local.sh N [key=value ...]}"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || command -v python3)}"
HVDRUN="$(dirname "$PY")/horovodrun"; [ -x "$HVDRUN" ] || HVDRUN=horovodrun
cd "$ROOT"
exec "$HVDRUN" -np "$N" -H "localhost:$N" "--${HVD_CONTROLLER:-gloo}" "$PY" -m datkit.train backend=horovod "$@"
