#!/usr/bin/env bash
# A/B of the flip augmentation (issue 8): PRESET with each flip mode and no test-time augmentation,
# one run each (fast: about 2.5 minutes per mode on 2 CPU cores; best: about 11).
# Usage: bash experiments/ab/flip.sh [PRESET] [MODES]
set -euo pipefail
PRESET=${1:-fast}
MODES=${2:-none patch image both}
for MODE in $MODES; do
  bash "$(dirname "$0")/variant.sh" "flip-$PRESET-$MODE" "$PRESET" augment.flip=$MODE train.tta=none
done
