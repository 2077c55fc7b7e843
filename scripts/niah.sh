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
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/exp/longctx/niah}
MNEMO=${MNEMO:-target/release/mnemo}
INIT=${INIT:-runs/tiny-real}
STEPS=${STEPS:-400}
CONT_STEPS=${CONT_STEPS:-40}
SAMPLES=${SAMPLES:-10}
R=results/niah
mkdir -p "$W" "$R"
EV="--task niah --depths 0,0.25,0.5,0.75,1 --samples $SAMPLES --quiet"

# 1. NIAH at 256 tokens: every training row is a synthetic document (code-like filler + needle).
if [ ! -f "$W/base/checkpoint/model.safetensors" ]; then
  "$MNEMO" train --init "$INIT" --synthetic niah --synthetic-mix 1.0 --seq-len 256 \
    --batch-size 8 --steps "$STEPS" --set train.warmup_steps=30 --set train.eval_interval=100 \
    --out "$W/base" --quiet 2>&1 | tail -3
fi
# 2. YaRN continuation: 4x context (1024), a few dozen steps.
if [ ! -f "$W/yarn4/checkpoint/model.safetensors" ]; then
  "$MNEMO" train --init "$W/base" --seq-len 1024 --rope-scaling-factor 4 --batch-size 4 \
    --steps "$CONT_STEPS" --lr 1e-3 --set train.warmup_steps=5 --set train.eval_interval=1000 \
    --out "$W/yarn4" --quiet 2>&1 | tail -3
fi
# 3. Evaluations.
"$MNEMO" eval $EV --model "$W/base" --context 256 --json "$R/base.json"
"$MNEMO" eval $EV --model "$W/base" --context 256,512,1024 --extend 4 --extend-mode plain --json "$R/base_plain_extrapolation.json"
"$MNEMO" eval $EV --model "$W/base" --context 256,512,1024 --extend 4 --json "$R/base_zero_shot_yarn.json"
"$MNEMO" eval $EV --model "$W/yarn4" --context 256,512,1024 --json "$R/yarn4_continued.json"
# 4. Heat-maps.
${PYTHON:-python3} scripts/niah_plot.py "$R"
