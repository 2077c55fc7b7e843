#!/usr/bin/env bash
# NIAH with a loss on the answer tokens only (issue #6): a tiny model learns to retrieve the needle
# at its training context (256 tokens), then is evaluated at 1x, 2x and 4x that context.
#   stage 1  every row a NIAH training document (1 needle + 3 answered extra needles), loss on
#            every next token, STEPS1 steps from INIT (this is scripts/niah.sh's `base` run);
#   stage 2  the same documents, `--synthetic-loss answers`: only the answer tokens (the digits
#            and `;` of the final and of the extra answers) count in the loss, STEPS2 steps;
#   stage 3  a second answer-only run of STEPS3 steps from stage 2 (fresh warm-up and cosine:
#            the retrieval of the first digit only appears here);
#   yarn4    YaRN x4 continuation at 1024 tokens (same answer-only NIAH rows), CONT_STEPS steps.
# Evaluations: stage 3 at 256; at 256/512/1024 with plain extrapolation and with zero-shot YaRN
# x4 (eval --extend 4); yarn4 at 256/512/1024. Heat-maps and partial.csv via scripts/niah_plot.py.
# Usage: scripts/niah-answers.sh [WORK_DIR]   (default runs/exp/niah2; ~50 min on 2 busy cores)
# Env: INIT (default runs/tiny-real), STAGE1 (reuse an existing stage-1 run dir instead of
#      training one), STEPS1 (500), STEPS2 (800), STEPS3 (1200), CONT_STEPS (40), SAMPLES (10),
#      MNEMO, MNEMO_CACHE.
# MNEMO_SMOKE=1: a 2-step INIT, 2 + 1 + 1 + 1 steps of batch 1, 1 sample per cell, into a temp
# dir (docs/scripts.md; the heat-maps need matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-runs/exp/niah2}
MNEMO=${MNEMO:-target/release/mnemo}
INIT=${INIT:-runs/tiny-real}
STEPS1=${STEPS1:-500}
STEPS2=${STEPS2:-800}
STEPS3=${STEPS3:-1200}
CONT_STEPS=${CONT_STEPS:-40}
SAMPLES=${SAMPLES:-10}
R=results/niah/answers
BATCH=8; CONT_BATCH=4
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
if [ "$smoke" = 1 ]; then
  . scripts/smoke-env.sh
  # INIT: a 2-step stand-in for runs/tiny-real; 2 + 1 + 1 + 1 steps of batch 1; 1 sample per cell.
  MNEMO=$smoke_bin; W=$smoke_dir/work; R=$smoke_dir/niah-answers; INIT=$smoke_dir/init
  STEPS1=2; STEPS2=1; STEPS3=1; CONT_STEPS=1; SAMPLES=1; BATCH=1; CONT_BATCH=1
  smoke_run "$INIT"
fi
mkdir -p "$W" "$R"
EV="--task niah --depths 0,0.25,0.5,0.75,1 --samples $SAMPLES --quiet"

# 1. Stage 1: loss on every token (learns the format and copying of the later digits).
S1=${STAGE1:-$W/stage1}
if [ ! -f "$S1/checkpoint/model.safetensors" ]; then
  "$MNEMO" train --init "$INIT" --synthetic niah --synthetic-mix 1.0 --seq-len 256 \
    --batch-size "$BATCH" --steps "$STEPS1" --set train.warmup_steps=30 --set train.eval_interval=100 \
    --out "$S1" --quiet 2>&1 | tail -3
fi
# 2. Stage 2: loss on the answer tokens only.
if [ ! -f "$W/stage2/checkpoint/model.safetensors" ]; then
  "$MNEMO" train --init "$S1" --synthetic niah --synthetic-mix 1.0 --synthetic-loss answers \
    --seq-len 256 --batch-size "$BATCH" --steps "$STEPS2" --lr 1e-3 --set train.warmup_steps=20 \
    --set train.eval_interval=400 --set train.eval_batches=2 --out "$W/stage2" --quiet 2>&1 | tail -3
fi
if [ ! -f "$W/stage3/checkpoint/model.safetensors" ]; then
  "$MNEMO" train --init "$W/stage2" --synthetic niah --synthetic-mix 1.0 --synthetic-loss answers \
    --seq-len 256 --batch-size "$BATCH" --steps "$STEPS3" --lr 1e-3 --set train.warmup_steps=20 \
    --set train.eval_interval=600 --set train.eval_batches=2 --out "$W/stage3" --quiet 2>&1 | tail -3
fi
# 3. YaRN x4 continuation at 1024 tokens (inherits the answer-only NIAH rows).
if [ ! -f "$W/yarn4/checkpoint/model.safetensors" ]; then
  "$MNEMO" train --init "$W/stage3" --seq-len 1024 --rope-scaling-factor 4 --batch-size "$CONT_BATCH" \
    --steps "$CONT_STEPS" --lr 5e-4 --set train.warmup_steps=5 --set train.eval_interval=1000 \
    --out "$W/yarn4" --quiet 2>&1 | tail -3
fi
# 4. Evaluations.
"$MNEMO" eval $EV --model "$W/stage3" --context 256 --json "$R/base.json"
"$MNEMO" eval $EV --model "$W/stage3" --context 256,512,1024 --extend 4 --extend-mode plain --json "$R/base_plain_extrapolation.json"
"$MNEMO" eval $EV --model "$W/stage3" --context 256,512,1024 --extend 4 --json "$R/base_zero_shot_yarn.json"
"$MNEMO" eval $EV --model "$W/yarn4" --context 256,512,1024 --json "$R/yarn4_continued.json"
"$MNEMO" eval $EV --model "$W/stage3" --context 2048 --extend 8 --json "$R/base_zero_shot_yarn8_2048.json"
# 5. Heat-maps.
if [ "$smoke" = 1 ] && ! "$PYTHON" -c 'import matplotlib' 2>/dev/null; then
  echo "matplotlib missing: no heat-maps" >&2; exit 0
fi
${PYTHON:-python3} scripts/niah_plot.py "$R" "answer-only loss"
