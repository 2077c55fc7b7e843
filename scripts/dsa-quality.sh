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
${PYTHON:-python3} scripts/plot-dsa-quality.py "$R" "$STEPS" "$WARM" "$SEQ" "$TOPK"
