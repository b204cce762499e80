#!/usr/bin/env bash
# T and C per epoch of the main job's steps on each backend (torch, Horovod, DeepSpeed ZeRO-0), 2 workers on this
# machine, for Adam, 1-bit Adam and Adam + onebit gradient compression: 3 epochs, the median of epochs 2-3 (1-bit
# Adam's warm-up is epoch 1: optim.freeze_step=39). Needs Horovod and DeepSpeed in .venv (bash tests/run.sh sets
# them up). Results: runs/compare_backends/<backend>_<variant>/ and one table on stdout.
# Usage: bash launchers/compare_backends.sh [extra key=value overrides]
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python
OUT=runs/compare_backends
COMMON="train.epochs=3 optim.freeze_step=39 eval.every=100 eval.final_num_samples=100 eval.aa_samples=0 eval.co_samples=0 log.progress=false log.tensorboard=false log.plot=false"
mkdir -p "$OUT"
run() {
  local name=$1; shift
  rm -rf "${OUT:?}/$name"
  # shellcheck disable=SC2086  # the overrides are words
  "$@" $COMMON "train.output_dir=$OUT/$name" "${EXTRA[@]}" > "$OUT/$name.log" 2>&1 || echo "$name failed (see $OUT/$name.log)"
}
EXTRA=("$@")
for variant in optim.name=adam optim.name=onebit_adam compression.name=onebit; do
  tag=${variant//[.=]/_}
  run "torch_$tag" $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m datkit.train backend=torch "$variant"
  run "horovod_$tag" $PY -m horovod.runner.launch -np 2 -H localhost:2 --gloo $PY -m datkit.train backend=horovod "$variant"
  run "deepspeed_$tag" .venv/bin/deepspeed --num_gpus 2 datkit/train.py backend=deepspeed deepspeed.zero_stage=0 "$variant"
done
$PY - "$OUT" <<'PY'
import glob, json, statistics, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/*/results.json")):
    epochs = json.load(open(path))["epochs"][1:]
    name = path.split("/")[-2]
    print(f"{name:45s} T/epoch {statistics.median(e['T_s'] for e in epochs):6.2f} s  "
          f"C/epoch {statistics.median(e['C_s'] for e in epochs):5.2f} s  bytes/iter {epochs[-1]['bytes_per_iter']:,.0f}")
PY
