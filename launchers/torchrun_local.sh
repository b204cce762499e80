#!/usr/bin/env bash
# One host, N workers: launchers/torchrun_local.sh N [--config FILE] [key=value ...]
# (gloo on CPU, NCCL when GPUs are present: one worker per GPU).
set -euo pipefail
N="${1:?usage: torchrun_local.sh NPROC [--config FILE] [key=value ...]}"; shift
exec torchrun --standalone --nproc_per_node "$N" -m datkit.train "$@"
