#!/usr/bin/env bash
# Step-time overhead of Engram, table optimizer included, and the memory-only fine-tuning step:
# `tiny-engram` vs the same model without Engram vs `tiny-engram` with a frozen backbone
# (`--train-only engram`), interleaved step by step in one process (so load from other
# processes hits all three alike); medians of CPU time (all threads) and wall time per step.
#   scripts/engram-overhead.sh            ITERS=12 by default
# Results: results/engram-overhead/steps.json (+ summary.txt).
# MNEMO_SMOKE=1: one step of batch 1 x 32, into a temp dir (docs/scripts.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MNEMO=${MNEMO:-target/release/mnemo}
ITERS=${ITERS:-12}
PRESET=${PRESET:-tiny-engram}
OUT=${OUT:-results/engram-overhead}
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
SHAPE=()
if [ "$smoke" = 1 ]; then
  . scripts/smoke-env.sh
  MNEMO=$smoke_bin; ITERS=1; OUT=$smoke_dir/engram-overhead; SHAPE=(--batch-size 1 --seq-len 32)
fi
mkdir -p "$OUT"
$MNEMO bench train-step --preset "$PRESET" --iters "$ITERS" --warmup 2 --vs-no-engram --vs-frozen "${SHAPE[@]}" \
  > "$OUT/steps.json" 2> "$OUT/summary.txt"
cat "$OUT/summary.txt"
${PYTHON:-python3} - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = json.load(open(f"{out}/steps.json"))
with open(f"{out}/summary.txt", "a") as f:
    for r in rows:
        line = (f"{r['label']:>24}: step {r['step_ms_median']:.0f} ms wall, {r['step_cpu_ms_median']:.0f} ms CPU; "
                f"phases (ms) {json.dumps({k: round(v, 1) for k, v in r['phase_ms'].items()})}; "
                f"flat params {r['params']:,}, table values {r['engram_table_params']:,}")
        print(line); f.write(line + "\n")
PY
