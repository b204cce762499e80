#!/usr/bin/env bash
# DeepSpeed across hosts listed in a hostfile ("node0 slots=6" per line).
# Usage: HOSTFILE=hosts LAUNCHER=pdsh|openmpi|slurm launchers/deepspeed_hostfile.sh [key=value ...]
#   pdsh (default) and openmpi reach the hosts over ssh; slurm runs inside an allocation (srun).
# Without ssh (one launch per host, e.g. emulated hosts): HOSTFILE=hosts NODE_RANK=i MASTER_ADDR=host0 NNODES=n
#   NPROC=k launchers/deepspeed_hostfile.sh ...   starts this host's share with --no_ssh --node_rank (DeepSpeed 0.19
#   still reads the hostfile there: without one it resets the master address to 127.0.0.1 and refuses >1 node).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${NODE_RANK:-}" ]; then
  exec deepspeed --hostfile "${HOSTFILE:?set HOSTFILE (one line per host, also with NODE_RANK)}" --no_ssh --node_rank "$NODE_RANK" --num_nodes "${NNODES:?}" --num_gpus "${NPROC:?}" \
    --master_addr "${MASTER_ADDR:?}" --master_port "${MASTER_PORT:-29500}" datkit/train.py backend=deepspeed "$@"
fi
exec deepspeed --hostfile "${HOSTFILE:?set HOSTFILE}" --launcher "${LAUNCHER:-pdsh}" \
  --master_port "${MASTER_PORT:-29500}" datkit/train.py backend=deepspeed "$@"
