#!/usr/bin/env bash
# Horovod across hosts: a hostfile ("host slots=N" per line, horovodrun's format) or a host list.
# Usage: HOSTFILE=hosts launchers/horovodrun_hostfile.sh [key=value ...]
#        HOSTS=node0:8,node1:8 launchers/horovodrun_hostfile.sh [key=value ...]
# NP (total workers) defaults to the sum of the slots. horovodrun starts the remote workers over ssh
# (passwordless, same paths and environment on every host); NIC=eth0 pins the network interface
# (--network-interface; needed when hosts have several), HVD_CONTROLLER=mpi uses MPI when built with it.
# PYTHON picks the interpreter (default: the repo's .venv, else python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || command -v python3)}"
HVDRUN="$(dirname "$PY")/horovodrun"; [ -x "$HVDRUN" ] || HVDRUN=horovodrun
if [ -n "${HOSTFILE:-}" ]; then
  HOSTARGS=(--hostfile "$HOSTFILE")
  SLOTS="$(( $(sed -n 's/^[^#]*slots=\([0-9]*\).*/\1/p' "$HOSTFILE" | paste -sd+) ))"
elif [ -n "${HOSTS:-}" ]; then
  HOSTARGS=(-H "$HOSTS")
  SLOTS="$(( $(tr ',' '\n' <<<"$HOSTS" | sed 's/.*://' | paste -sd+) ))"
else
  echo "usage: HOSTFILE=hosts (or HOSTS=a:4,b:4) $0 [key=value ...]" >&2; exit 2
fi
NP="${NP:-$SLOTS}"
EXTRA=()
[ -n "${NIC:-}" ] && EXTRA+=(--network-interface "$NIC")
cd "$ROOT"
exec "$HVDRUN" -np "$NP" "${HOSTARGS[@]}" "--${HVD_CONTROLLER:-gloo}" ${EXTRA[@]+"${EXTRA[@]}"} \
  "$PY" -m datkit.train backend=horovod "$@"
