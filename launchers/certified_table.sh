#!/usr/bin/env bash
# The certified-training table of docs/results.md (issue 19): fast IBP, CROWN-IBP (loss fusion), MTL-IBP and SABR on
# the offline config (configs/mnist5k_ibp.yaml: mnist5k, narrow CNN-7, eps 0.3, 12 epochs, one CPU core each, two
# runs at a time), evaluated on the official MNIST test set (../shared/data) with PGD-10 and the verification
# cascade [ibp, crown-ibp, crown] sharded over 2 workers (python -m datkit.evaluate attacks=[pgd,verified]).
# MTL-IBP's alpha and SABR's lambda were chosen on mnist5k's held-out split (configs/search/certified.txt).
# Results: runs/certified_table/<name>/ and one Markdown table on stdout.
# Usage: bash launchers/certified_table.sh [extra key=value overrides for every training run]
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python
OUT=runs/certified_table
mkdir -p "$OUT"
COMMON=(--config configs/mnist5k_ibp.yaml "bounds.verify=[ibp,crown-ibp]" eval.aa_samples=0 log.progress=false
        log.tensorboard=false)
declare -A METHOD=(
  [ibp]="method.name=ibp"
  [crown_ibp]="method.name=crown-ibp"
  [mtl_ibp]="method.name=mtl-ibp bounds.alpha=0.5 attack.steps=1 attack.alpha=0.6 attack.eval_mode=true"
  [sabr]="method.name=sabr bounds.lambda_box=0.6 attack.steps=3 attack.eval_mode=true"
)
train() {
  local name=$1; shift
  rm -rf "${OUT:?}/$name"
  # shellcheck disable=SC2086  # the method's overrides are words
  OMP_NUM_THREADS=1 $PY -m datkit.train "${COMMON[@]}" ${METHOD[$name]} "train.output_dir=$OUT/$name" "$@" \
    > "$OUT/$name.log" 2>&1 || echo "$name failed (see $OUT/$name.log)"
}
(train ibp "$@"; train mtl_ibp "$@") &
(train crown_ibp "$@"; train sabr "$@") &
wait
for name in ibp crown_ibp mtl_ibp sabr; do
  OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m datkit.evaluate \
    "checkpoint=$OUT/$name/checkpoint_last.pt" "attacks=[pgd,verified]" "bounds.verify=[ibp,crown-ibp,crown]" \
    pgd_steps=10 "output=$OUT/$name/cascade.json" > "$OUT/$name.eval.log" 2>&1 || echo "$name: evaluation failed"
done
$PY - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print("| method | TA | RA (PGD-10) | VA by IBP | VA by the cascade | + CROWN-IBP | + CROWN | RA - VA | training (s) | cascade (s) |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name in ("ibp", "crown_ibp", "mtl_ibp", "sabr"):
    try:
        ev = json.load(open(f"{out}/{name}/cascade.json"))
        train = json.load(open(f"{out}/{name}/results.json"))["final"]
    except (OSError, KeyError, ValueError):
        print(f"| {name} | (missing) |")
        continue
    secs = sum(ev.get(f"VA_time_{s}_s", 0.0) for s in ("ibp", "crown-ibp", "crown"))
    print(f"| {name} | {ev['TA']:.4f} | {ev['RA']:.4f} | {ev['VA_gain_ibp']:.4f} | **{ev['VA']:.4f}** | "
          f"+{ev['VA_gain_crown-ibp']:.4f} | +{ev['VA_gain_crown']:.4f} | {ev['VA_gap']:.4f} | "
          f"{train['train_time_s']:.0f} | {secs:.0f} |")
PY
