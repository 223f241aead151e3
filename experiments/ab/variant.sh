#!/usr/bin/env bash
# One A/B arm: train PRESET with extra `--set` overrides into experiments/runs/ab-NAME, predict the
# test folder with the run's own test-time augmentation, grade it; prints best val and the grades.
# Usage: bash experiments/ab/variant.sh NAME PRESET [SECTION.FIELD=VALUE ...] [DATA=data/course]
# Two arms run side by side with OMP_NUM_THREADS=1 each use the 2 cores about as well as one run.
set -euo pipefail
NAME=$1 PRESET=$2
shift 2
DATA=${DATA:-data/course}
SS="uv run --frozen shortcut-study"
RUN=experiments/runs/ab-$NAME
SETS=()
for s in "$@"; do SETS+=(--set "$s"); done
mkdir -p experiments/runs
$SS train --data "$DATA" --out "$RUN" --preset "$PRESET" "${SETS[@]}" >/dev/null 2>"$RUN.log" || { tail -3 "$RUN.log"; exit 1; }
$SS predict --checkpoint "$RUN/q1_model.pt" --images "$DATA/test_unlabeled" --out "$RUN/q1_test.txt" >/dev/null
echo "== $NAME: preset $PRESET $*"
uv run --frozen python -c "import pandas as p; h=p.read_csv('$RUN/history.csv'); print(f'best val {h.val_acc.max():.2f} % (epoch {h.val_acc.idxmax()+1} of {len(h)}), train acc {h.train_acc.iloc[-1]:.2f} %, images/s median {h.images_per_s.median():.0f}, train {h.train_seconds.sum()/60:.1f} min')"
$SS evaluate --predictions "$RUN/q1_test.txt" --labels "$DATA/test_labels.csv"
