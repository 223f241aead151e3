#!/usr/bin/env bash
# The check the shortcut-strength study owes: its (erm, 0.64, 16 px) cells against the `methods`
# preset trained alone on the course dataset (`make data`) with the default grid's recipe, one run
# per seed, graded with `evaluate` (aligned / conflicting test accuracy).
# Usage: [EXTRA_SETS="--set train.threads=1"] experiments/ab/compare_erm_reference.sh [SEEDS...]   (default 0 1 2)
set -euo pipefail
cd "$(dirname "$0")/../.."
seeds=("${@:-0 1 2}")
for seed in ${seeds[@]}; do
  out=experiments/runs/compare-erm-reference/seed$seed
  uv run --frozen shortcut-study train --data data/course --out "$out" --preset methods \
    --set train.epochs=3 --set train.subset=12000 --set train.tta=none --set train.seed="$seed" ${EXTRA_SETS:-} >/dev/null
  uv run --frozen shortcut-study predict --checkpoint "$out/q1_model.pt" --images data/course/test_unlabeled \
    --out "$out/q1_test.txt" >/dev/null
  echo "seed $seed"
  uv run --frozen shortcut-study evaluate --predictions "$out/q1_test.txt" --labels data/course/test_labels.csv
done
