#!/usr/bin/env bash
# A/B of the flip augmentation (issue 8): the `fast` preset with each flip mode, no flip TTA,
# one run each; prints the val history's best and the graded test metrics.
# Usage: bash experiments/ab/flip.sh [DATA] [PRESET] [MODES]
#   (fast: about 2.5 minutes per mode on 2 CPU cores; best: about 11)
set -euo pipefail
DATA=${1:-data/course}
PRESET=${2:-fast}
MODES=${3:-none patch image both}
SS="uv run --frozen shortcut-study"
for MODE in $MODES; do
  RUN=experiments/runs/ab-flip-$PRESET-$MODE
  $SS train --data "$DATA" --out "$RUN" --preset "$PRESET" --set augment.flip=$MODE \
      --set train.tta=none >/dev/null 2>"$RUN.log" || { cat "$RUN.log"; exit 1; }
  $SS predict --checkpoint "$RUN/q1_model.pt" --images "$DATA/test_unlabeled" --out "$RUN/q1_test.txt" >/dev/null
  echo "== flip=$MODE"
  uv run --frozen python -c "import pandas as p; h=p.read_csv('$RUN/history.csv'); print(f'best val {h.val_acc.max():.2f} %, images/s median {h.images_per_s.median():.0f}')"
  $SS evaluate --predictions "$RUN/q1_test.txt" --labels "$DATA/test_labels.csv"
done
