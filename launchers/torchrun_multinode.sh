#!/usr/bin/env bash
# Several hosts: run this on every host with the same RDZV_ENDPOINT (host:port of any one of them).
#   NNODES=6 NPROC=6 RDZV_ENDPOINT=node0:29500 launchers/torchrun_multinode.sh --config configs/imagenet_resnet50_pgd.yaml
set -euo pipefail
: "${NNODES:?set NNODES}" "${NPROC:?set NPROC (workers per host)}" "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}"
exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" \
  --rdzv_id "${RDZV_ID:-datkit}" -m datkit.train "$@"
