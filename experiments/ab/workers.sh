#!/usr/bin/env bash
# One sweep worker vs WORKERS=2 sharing the cores, on the same 8-trial study (fixed 2 epochs on a
# 5,000-image subset, so every trial does the same work): trials per hour and images/s per worker.
# Usage: [STORAGE=URL TRACKING_URI=URL] bash experiments/ab/workers.sh   (default: SQLite files here;
# with `make server` running, its two URLs, so the workers go through PostgreSQL and the MLflow server)
set -euo pipefail
DATA=${DATA:-data/course}
OUT=experiments/runs/ab-workers
rm -rf "$OUT" && mkdir -p "$OUT"
STORAGE=${STORAGE:-sqlite:///$PWD/$OUT/optuna.db}
TRACKING_URI=${TRACKING_URI:-sqlite:///$PWD/$OUT/mlflow.db}
SUFFIX=$(date +%s)
uv run --frozen python -c "import torch; print('capability', torch.backends.cpu.get_cpu_capability())"
for W in 1 2; do
  start=$(date +%s.%N)
  uv run --frozen shortcut-study sweep --data "$DATA" --study "workers-$W-$SUFFIX" --n-trials 8 --epochs 2 \
    --subset 5000 --timeout 0 --storage "$STORAGE" --tracking-uri "$TRACKING_URI" --workers "$W" > "$OUT/sweep-$W.log" 2>&1
  end=$(date +%s.%N)
  uv run --frozen python - "$W" "$start" "$end" "$STORAGE" "workers-$W-$SUFFIX" <<'PY'
import sys, statistics, optuna
from shortcut_study.study import open_storage
w, start, end, url, name = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
optuna.logging.set_verbosity(optuna.logging.WARNING)
trials = [t for t in optuna.load_study(study_name=name, storage=open_storage(url)).trials
          if t.state.name in ("COMPLETE", "PRUNED")]
ips = [t.user_attrs["images_per_s"] for t in trials if "images_per_s" in t.user_attrs]
hours = (end - start) / 3600
print(f"workers {w}: {len(trials)} trials in {hours * 60:.1f} min = {len(trials) / hours:.0f} trials/hour; "
      f"images/s per worker (median over trials) {statistics.median(ips):.0f}; all workers {w * statistics.median(ips):.0f}")
PY
done
