#!/bin/bash
# Training-step time of tiny vs tiny-dsa (sparse stage, top-16), interleaved A/B/A/B so that
# both see the same machine load. Usage: scripts/dsa_train_step.sh [mnemo binary]
# Output: results/dsa/train_step.jsonl (one JSON per run: preset, seq_len, step/CPU ms medians).
# MNEMO_SMOKE=1: one rep at 64 tokens, batch 1, into a temp dir (docs/scripts.md).
set -e
B=${1:-target/release/mnemo}
OUT=results/dsa/train_step.jsonl
REPS="1 2"; CFGS=("256 4" "1024 1")
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
if [ "$smoke" = 1 ]; then
  cd "$(dirname "$0")/.."
  . scripts/smoke-env.sh
  B=$smoke_bin; OUT=$smoke_dir/dsa/train_step.jsonl; REPS=1; CFGS=("64 1"); mkdir -p "$(dirname "$OUT")"
fi
: > $OUT
for rep in $REPS; do
  for cfg in "${CFGS[@]}"; do
    set -- $cfg
    for p in tiny tiny-dsa; do
      $B bench train-step --preset $p --seq-len $1 --batch-size $2 --set max_seq_len=1024 \
        --iters 4 --warmup 1 2>/dev/null \
        | python3 -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'preset':'$p','rep':$rep,'seq_len':r['seq_len'],'batch':r['batch'],'step_ms':r['step_ms_median'],'cpu_ms':r['step_cpu_ms_median'],'phase_ms':r['phase_ms']}))" >> $OUT
    done
  done
done
cat $OUT
