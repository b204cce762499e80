#!/usr/bin/env bash
# The main job's recipe search, rerunnable: every candidate of a list (default configs/search/main_job.txt; one per
# line: NAME key=value ...) is trained with 2 workers (torchrun, gloo, CPU) on mnist5k's TRAINING split (4,500
# images) and evaluated on its held-out split (500 images, data.test=split) -- never on the official test set the
# main job reports on. Then one table: TA, RA (PGD-20, eps 0.3), AA (when the candidate asks for it), training
# time T, whole wall time, and whether catastrophic overfitting stopped it.
# Usage: bash launchers/search_main_job.sh [CANDIDATES.txt] [NAME ...]   (names: only those candidates)
# Results: runs/search/<NAME>/ and runs/search/table.md. Candidates already finished are not run again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIST="${1:-$ROOT/configs/search/main_job.txt}"
shift || true
source "$ROOT/launchers/setup_env.sh" autoattack
cd "$ROOT"
OUT="${DATKIT_SEARCH_DIR:-runs/search}"
mkdir -p "$OUT"
while read -r name overrides; do
  case "$name" in ""|\#*) continue ;; esac
  if [ "$#" -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
  [ -f "$OUT/$name/results.json" ] && { echo "search: $name done already"; continue; }
  echo "search: $name: $overrides"
  start=$SECONDS
  # shellcheck disable=SC2086  # the overrides are words
  "$ROOT/.venv/bin/python" -m torch.distributed.run --standalone --nproc_per_node 2 -m datkit.train \
    data.test=split log.progress=false log.tensorboard=false train.output_dir="$OUT/$name" $overrides \
    > "$OUT/$name.log" 2>&1 || echo "search: $name failed (see $OUT/$name.log)"
  echo $((SECONDS - start)) > "$OUT/$name.wall_s"
done < "$LIST"
"$ROOT/.venv/bin/python" - "$LIST" "$OUT" <<'PY'
import json, os, sys
lst, out = sys.argv[1:]
rows = ["| candidate | TA | RA | AA (n) | T (s) | wall (s) | catastrophic overfitting | overrides |", "|---|---|---|---|---|---|---|---|"]
for line in open(lst):
    if not line.strip() or line.startswith("#"):
        continue
    name, *over = line.split()
    path = os.path.join(out, name, "results.json")
    if not os.path.exists(path):
        continue
    f = json.load(open(path))["final"]
    wall = open(os.path.join(out, name + ".wall_s")).read().strip() if os.path.exists(os.path.join(out, name + ".wall_s")) else "-"
    co = f.get("catastrophic_overfitting")
    aa = f"{f['AA']:.4f} ({f['n_aa']})" if f.get("AA") is not None else "-"
    rows.append(f"| {name} | {f['TA']:.4f} | {f['RA']:.4f} | {aa} | {f['train_time_s']:.1f} | {float(wall):.0f} | "
                f"{'epoch %d' % co['epoch'] if co else 'no'} | `{' '.join(over)}` |")
table = "\n".join(rows)
open(os.path.join(out, "table.md"), "w").write(table + "\n")
print(table)
PY
