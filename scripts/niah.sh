#!/usr/bin/env bash
# Needle-in-a-haystack evidence for issue #6 (long context): a tiny model learns NIAH at its
# training context (256 tokens), then is evaluated at 1x, 2x and 4x that context
#   (a) as is, with plain RoPE extrapolation (eval --extend 4 --extend-mode plain),
#   (b) with zero-shot YaRN (eval --extend 4),
#   (c) after a YaRN continuation stage of a few dozen steps at 1024 tokens
#       (train --init ... --seq-len 1024 --rope-scaling-factor 4).
# Usage: scripts/niah.sh [WORK_DIR]   (default runs/exp/longctx/niah; ~15 min on 2 cores)
# Env: INIT (a pretrained run to start from, default runs/tiny-real), STEPS (400),
#      CONT_STEPS (40), SAMPLES (10), MNEMO (binary), MNEMO_CACHE (token cache).
# MNEMO_SMOKE=1: a 2-step INIT, 2 + 1 steps of batch 1, 1 sample per cell, into a temp dir
# (docs/scripts.md; the heat-maps need matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/exp/longctx/niah}
MNEMO=${MNEMO:-target/release/mnemo}
INIT=${INIT:-runs/tiny-real}
STEPS=${STEPS:-400}
CONT_STEPS=${CONT_STEPS:-40}
SAMPLES=${SAMPLES:-10}
R=results/niah
BATCH=8; CONT_BATCH=4
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
if [ "$smoke" = 1 ]; then
  . scripts/smoke-env.sh
  # INIT: a 2-step stand-in for runs/tiny-real; 2 + 1 steps of batch 1; 1 sample per cell.
  MNEMO=$smoke_bin; W=$smoke_dir/work; R=$smoke_dir/niah; INIT=$smoke_dir/init
  STEPS=2; CONT_STEPS=1; SAMPLES=1; BATCH=1; CONT_BATCH=1
  smoke_run "$INIT"
fi
mkdir -p "$W" "$R"
EV="--task niah --depths 0,0.25,0.5,0.75,1 --samples $SAMPLES --quiet"

# 1. NIAH at 256 tokens: every training row is a synthetic document (code-like filler + needle).
if [ ! -f "$W/base/checkpoint/model.safetensors" ]; then
  "$MNEMO" train --init "$INIT" --synthetic niah --synthetic-mix 1.0 --seq-len 256 \
    --batch-size "$BATCH" --steps "$STEPS" --set train.warmup_steps=30 --set train.eval_interval=100 \
    --out "$W/base" --quiet 2>&1 | tail -3
fi
# 2. YaRN continuation: 4x context (1024), a few dozen steps.
if [ ! -f "$W/yarn4/checkpoint/model.safetensors" ]; then
  "$MNEMO" train --init "$W/base" --seq-len 1024 --rope-scaling-factor 4 --batch-size "$CONT_BATCH" \
    --steps "$CONT_STEPS" --lr 1e-3 --set train.warmup_steps=5 --set train.eval_interval=1000 \
    --out "$W/yarn4" --quiet 2>&1 | tail -3
fi
# 3. Evaluations.
"$MNEMO" eval $EV --model "$W/base" --context 256 --json "$R/base.json"
"$MNEMO" eval $EV --model "$W/base" --context 256,512,1024 --extend 4 --extend-mode plain --json "$R/base_plain_extrapolation.json"
"$MNEMO" eval $EV --model "$W/base" --context 256,512,1024 --extend 4 --json "$R/base_zero_shot_yarn.json"
"$MNEMO" eval $EV --model "$W/yarn4" --context 256,512,1024 --json "$R/yarn4_continued.json"
# 4. Heat-maps.
if [ "$smoke" = 1 ] && ! "$PYTHON" -c 'import matplotlib' 2>/dev/null; then
  echo "matplotlib missing: no heat-maps" >&2; exit 0
fi
${PYTHON:-python3} scripts/niah_plot.py "$R"
