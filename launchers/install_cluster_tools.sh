#!/usr/bin/env bash
# Install the cluster tools datkit's HPC tests and users' local clusters use: Slurm (slurmctld, slurmd, the
# client commands), munge (Slurm's authentication) and Open MPI 4.1 with its headers (Horovod's MPI build and
# `srun --mpi=pmix`). Debian / Ubuntu packages through apt-get; needs root.
#
# Usage:  bash launchers/install_cluster_tools.sh          (idempotent: does nothing when all are installed)
# Exit codes: 0 installed (or already there); 3 not possible on this machine (not root, no apt-get): the message
# says why, and the tests that need these tools skip with that reason. tests/run.sh calls this first.
# Installing does not start any daemon: `python -m datkit.netemu slurm up` starts a cluster on emulated hosts.
set -euo pipefail
PKGS=(slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev)
say() { echo "install_cluster_tools: $*" >&2; }
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} = 0 ]; then
  say "Slurm, munge and Open MPI already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  say "apt-get not found: install ${missing[*]} with this system's package manager (Slurm/MPI tests will skip)"
  exit 3
fi
if [ "$(id -u)" != 0 ]; then
  say "not root: run 'sudo apt-get install ${missing[*]}' (Slurm/MPI tests will skip)"
  exit 3
fi
say "installing ${missing[*]} (apt-get; about half a minute)"
export DEBIAN_FRONTEND=noninteractive
# the package lists may be missing on a fresh container: refresh them once if the first install fails
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
say "installed ${missing[*]}"
