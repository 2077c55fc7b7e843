#!/bin/bash
# DSA training recipe on the real corpus, short: `tiny-dsa` (indexer 4x16, top-16) at 128-token
# windows, 60 steps `dense` (everything trains, dense attention, the indexer learns beside),
# then 20 steps `warmup` (only the indexer), then 40 steps `sparse` (top-k attention), each
# stage a `--resume --dsa-stage`. Copies metrics.jsonl to results/dsa/.
# Usage: scripts/dsa_stages.sh [mnemo binary] [run dir]
# MNEMO_SMOKE=1: 2 + 1 + 1 steps of batch 2 on crates/mnemo-pack/src, into a temp dir (docs/scripts.md).
set -e
B=${1:-target/release/mnemo}
R=${2:-runs/exp/dsa/tiny-dsa}
DATA=data/corpus; TOK=runs/tiny-real/tokenizer.json; S1=60; S2=80; S3=120; BS=16; EVERY=20
RES=results/dsa
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
if [ "$smoke" = 1 ]; then
  cd "$(dirname "$0")/.."
  . scripts/smoke-env.sh
  # The tokenizer of a 2-step stand-in for runs/tiny-real; 2 + 1 + 1 steps of batch 2.
  B=$smoke_bin; R=$smoke_dir/work/tiny-dsa; RES=$smoke_dir/dsa; DATA=$smoke_data
  smoke_run "$smoke_dir/init"; TOK=$smoke_dir/init/tokenizer.json
  S1=2; S2=3; S3=4; BS=2; EVERY=1
fi
rm -rf "$R"
$B train --preset tiny-dsa --data "$DATA" --tokenizer "$TOK" \
  --out "$R" --steps $S1 --seq-len 128 --batch-size $BS --dsa-stage dense \
  --set train.eval_interval=$EVERY --set train.save_interval=$EVERY --quiet
$B train --resume "$R" --steps $S2 --dsa-stage warmup --quiet
$B train --resume "$R" --steps $S3 --dsa-stage sparse --quiet
mkdir -p "$RES"
cp "$R/metrics.jsonl" "$RES/tiny_dsa_stages_metrics.jsonl"
