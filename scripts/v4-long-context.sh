#!/usr/bin/env bash
# DeepSeek-V4 (`v4-small`) against mnemo's V3.2-style DSA model (`small-dsa`) at long context:
# KV-cache bytes per token and decode ms/token at 4K, 32K and 128K (random weights: the cost
# does not depend on the values). Both caches are filled with the benchmark-only window
# prefill (`--window-prefill`: prefill chunks read their last top-k entries/positions; decoding
# is exact). Run the two one after the other on a quiet machine.
# Writes results/v4-long/{v4-small,small-dsa}.json and long-context.png.
# Usage: scripts/v4-long-context.sh [CONTEXTS=4096,32768,131072]   (PYTHON with matplotlib)
# MNEMO_SMOKE=1: contexts 128 and 256, no plot, into a temp dir (docs/scripts.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ctx=${1:-4096,32768,131072}
py=${PYTHON:-python3}
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
if [ "$smoke" = 1 ]; then
  . scripts/smoke-env.sh
  # Two short contexts, 2 decode steps; no plot.
  mkdir -p "$smoke_dir/v4-long"
  for p in v4-small small-dsa; do
    "$smoke_bin" --threads 2 bench long-context --preset "$p" --contexts 128,256 \
      --decode 2 --window-prefill --json "$smoke_dir/v4-long/$p.json"
  done
  exit 0
fi
cargo build --release -q -p mnemo-cli
mkdir -p results/v4-long
for p in v4-small small-dsa; do
  target/release/mnemo --threads 2 bench long-context --preset "$p" --set max_seq_len=131200 \
    --contexts "$ctx" --decode 16 --window-prefill --json "results/v4-long/$p.json"
done
"$py" scripts/plot-v4-long.py
