#!/usr/bin/env bash
# Dense vs sparse (DSA) prefill and decode time per token at 4K–128K context, and a 1M-token
# decode with 8-bit indexer keys (cache filled by a window-local prefill, see below). Same model for both modes: `small-dsa` (d 512, 8 heads × 64,
# kv 4, indexer 4 × 32, top-512) cut to 2 layers, random weights (timing does not depend on
# the values). Writes results/dsa-long/{long-context.json,million.json,long-context.png}.
# MNEMO_SMOKE=1: contexts 256/512 and 1,024, no plot, into a temp dir (docs/scripts.md).
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
if [ "$smoke" = 1 ]; then
  . scripts/smoke-env.sh
  # Two short contexts and a 1,024-token stand-in for the million; no plot.
  mkdir -p "$smoke_dir/dsa-long"
  "$smoke_bin" bench long-context --preset small-dsa --set n_layers=2 --contexts 256,512 --decode 2 \
    --dense-prefill-max 512 --json "$smoke_dir/dsa-long/long-context.json"
  "$smoke_bin" bench long-context --preset small-dsa --set n_layers=2 --contexts 1024 --decode 2 \
    --dense-prefill-max 0 --int8 --window-prefill --json "$smoke_dir/dsa-long/million.json"
  exit 0
fi
cargo build --release -q
MNEMO=${MNEMO:-target/release/mnemo}
mkdir -p results/dsa-long
"$MNEMO" bench long-context --preset small-dsa --set n_layers=2 \
  --contexts "${CONTEXTS:-4096,16384,65536,131072}" --decode 16 --dense-prefill-max 65536 \
  --json results/dsa-long/long-context.json
if [ "${MILLION:-1}" = 1 ]; then
  # The exact DSA prefill of 1M tokens needs ~5.5e11 indexer pair scores per layer (hours
  # here): the cache is filled with a window-local prefill instead; decoding is exact DSA.
  "$MNEMO" bench long-context --preset small-dsa --set n_layers=2 \
    --contexts 1048576 --decode 8 --dense-prefill-max 0 --int8 --window-prefill \
    --json results/dsa-long/million.json
fi
reference/.venv/bin/python scripts/plot-dsa-long.py results/dsa-long
