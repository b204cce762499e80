#!/usr/bin/env bash
# DeepSpeed on one host: N workers (GPUs, or CPU processes with gloo when there is no GPU).
# Usage: launchers/deepspeed_local.sh N [key=value ...]     e.g.  launchers/deepspeed_local.sh 2 deepspeed.zero_stage=2
set -euo pipefail
N="${1:?usage: deepspeed_local.sh N [key=value ...]}"; shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
exec deepspeed --num_gpus "$N" --master_port "${MASTER_PORT:-29500}" datkit/train.py backend=deepspeed "$@"
