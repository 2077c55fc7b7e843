#!/bin/bash
# DSA training recipe on the real corpus, short: `tiny-dsa` (indexer 4x16, top-16) at 128-token
# windows, 60 steps `dense` (everything trains, dense attention, the indexer learns beside),
# then 20 steps `warmup` (only the indexer), then 40 steps `sparse` (top-k attention), each
# stage a `--resume --dsa-stage`. Copies metrics.jsonl to results/dsa/.
# Usage: scripts/dsa_stages.sh [mnemo binary] [run dir]
set -e
B=${1:-target/release/mnemo}
R=${2:-runs/exp/dsa/tiny-dsa}
rm -rf "$R"
$B train --preset tiny-dsa --data data/corpus --tokenizer runs/tiny-real/tokenizer.json \
  --out "$R" --steps 60 --seq-len 128 --batch-size 16 --dsa-stage dense \
  --set train.eval_interval=20 --set train.save_interval=20 --quiet
$B train --resume "$R" --steps 80 --dsa-stage warmup --quiet
$B train --resume "$R" --steps 120 --dsa-stage sparse --quiet
mkdir -p results/dsa
cp "$R/metrics.jsonl" results/dsa/tiny_dsa_stages_metrics.jsonl
