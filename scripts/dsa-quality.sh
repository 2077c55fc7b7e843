#!/usr/bin/env bash
# DSA quality vs dense attention at the same step budget and a 4K context (issue #6).
# Both arms start from the same dense checkpoint (INIT: the `tiny` model trained at 128 tokens on
# the real corpus) and continue at SEQ tokens per window for STEPS steps, same seed, same data order:
#   dense   plain attention for STEPS steps;
#   sparse  the same weights plus a fresh lightning indexer (tiny-dsa shape: 4 heads x 16, top-TOPK):
#           WARM steps of indexer warm-up (only the indexer trains: KL to the head-summed dense
#           attention), then STEPS-WARM steps of sparse training (top-k attention; the indexer on
#           its KL over the selected set, input detached) — DeepSeek-V3.2's two stages.
# Logged per arm: val loss every EVAL steps (the sparse arm evaluates with sparse attention), the
# indexer KL and recall (share of the dense attention mass inside the top-k) on training batches
# every LOG steps and on the validation windows. Results: results/dsa-quality/{*.jsonl,summary.json,quality.png}.
# Usage: scripts/dsa-quality.sh   (env: STEPS=100 WARM=20 SEQ=4096 TOPK=512 EVAL=20 LOG=5 THREADS=2;
#   ARMS="dense" and ARMS="sparse" run one arm each, e.g. two single-thread processes side by side;
#   the summary and plot are written once both arms are complete)
# MNEMO_SMOKE=1: a 2-step INIT, 2 steps per arm at 128 tokens, top-16, into a temp dir
# (docs/scripts.md; summary.json and the plot need matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."
MNEMO=${MNEMO:-target/release/mnemo}
INIT=${INIT:-runs/tiny-real}
DATA=${DATA:-data/corpus}
W=${WORK:-runs/exp/dsa-quality}
STEPS=${STEPS:-100}
WARM=${WARM:-20}
SEQ=${SEQ:-4096}
TOPK=${TOPK:-512}
EVAL=${EVAL:-20}
LOG=${LOG:-5}
THREADS=${THREADS:-2}
R=results/dsa-quality
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
if [ "$smoke" = 1 ]; then
  . scripts/smoke-env.sh
  # INIT: a 2-step stand-in for runs/tiny-real; 1 warm-up + 1 sparse step at 128 tokens, top-16.
  MNEMO=$smoke_bin; W=$smoke_dir/work; R=$smoke_dir/dsa-quality; INIT=$smoke_dir/init; DATA=$smoke_data
  STEPS=2; WARM=1; SEQ=128; TOPK=16; EVAL=1; LOG=1; THREADS=1
  smoke_run "$INIT"
fi
mkdir -p "$W" "$R"
COMMON="--init $INIT --data $DATA --seq-len $SEQ --set max_seq_len=$SEQ --batch-size 1 \
  --set train.eval_interval=$EVAL --set train.eval_batches=4 --set train.log_interval=$LOG \
  --set train.save_interval=$WARM --set train.warmup_steps=10 --quiet"
ARMS=${ARMS:-dense sparse}
done_arm() { grep -q "\"step\":$STEPS,.*val_loss" "$W/$1/metrics.jsonl" 2>/dev/null; }
if [[ " $ARMS " == *" dense "* ]] && ! done_arm dense; then
  rm -rf "$W/dense"
  $MNEMO --threads "$THREADS" train $COMMON --steps "$STEPS" --out "$W/dense" 2> "$W/dense.log"
fi
if [[ " $ARMS " == *" sparse "* ]] && ! done_arm sparse; then
  rm -rf "$W/sparse"
  $MNEMO --threads "$THREADS" train $COMMON --set dsa.index_topk="$TOPK" --dsa-stage warmup \
    --steps "$WARM" --out "$W/sparse" 2> "$W/sparse-warmup.log"
  $MNEMO --threads "$THREADS" train --resume "$W/sparse" --steps "$STEPS" --dsa-stage sparse --quiet \
    2> "$W/sparse.log"
fi
if ! done_arm dense || ! done_arm sparse; then
  echo "arms done: $(done_arm dense && echo dense) $(done_arm sparse && echo sparse); summary when both are"
  exit 0
fi
cp "$W/dense/metrics.jsonl" "$R/dense_metrics.jsonl"
cp "$W/sparse/metrics.jsonl" "$R/sparse_metrics.jsonl"
cp "$W/sparse/run.json" "$R/sparse_run.json"
if [ "$smoke" = 1 ] && ! "$PYTHON" -c 'import matplotlib' 2>/dev/null; then
  echo "matplotlib missing: no summary.json / quality.png" >&2; exit 0
fi
${PYTHON:-python3} scripts/plot-dsa-quality.py "$R" "$STEPS" "$WARM" "$SEQ" "$TOPK"
