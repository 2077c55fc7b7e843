#!/usr/bin/env bash
# Held-out expert load of the `small-moe` preset against the best a bias fitted to training
# text can do (README, "Load balance on the real corpus"). Trains the preset for STEPS steps
# (batch 8 × 256, evaluation every 10 steps, every step logged), keeping the checkpoints of
# the steps in KEEP; then `examples/moe_floor.rs` routes held-out text under each kept
# checkpoint with the run's bias and with an oracle bias fitted to 1,024 fresh training
# windows, and `scripts/plot-moe-floor.py` draws and summarises both. Writes OUT/floor.jsonl,
# OUT/floor.png and OUT/floor-summary.json beside the run's metrics. A run stopped early is
# resumed to STEPS first.
#
# Each kept checkpoint of `small-moe` is ~0.9 GB on disk (model + optimizer): the default KEEP
# (20 steps) needs ~18 GB. About an hour for 1,000 steps on 2 cores.
#
# Usage: scripts/moe-floor.sh CORPUS_DIR TOKENIZER_JSON OUT [STEPS=1000] [SEED=1337]
#   KEEP="50 60 …" overrides the kept steps (those beyond STEPS are dropped);
#   PYTHON names a python with matplotlib.
set -euo pipefail
corpus=$(realpath -m "${1:?corpus directory}")
tok=$(realpath -m "${2:?tokenizer.json}")
out=$(realpath -m "${3:?output run directory}")
steps=${4:-1000}; seed=${5:-1337}
py=${PYTHON:-python3}
keep=""
for s in ${KEEP:-50 60 70 80 90 100 110 120 130 140 150 200 300 400 500 600 700 800 900 1000}; do
  if [ "$s" -le "$steps" ]; then keep="${keep:+$keep,}$s"; fi
done
cd "$(dirname "$0")/.."
cargo build --release -q -p mnemo-cli
cargo build --release -q -p mnemo --example moe_floor
mnemo=target/release/mnemo
if [ ! -f "$out/checkpoint/state.json" ]; then
  $mnemo train --preset small-moe --data "$corpus" --tokenizer "$tok" \
    --steps "$steps" --batch-size 8 --seq-len 256 --seed "$seed" \
    --set train.log_interval=1 --set train.eval_interval=10 --set "train.keep_steps=[$keep]" \
    --out "$out"
elif [ "$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["step"])' "$out/checkpoint/state.json")" -lt "$steps" ]; then
  $mnemo train --resume "$out" --steps "$steps"
fi
mapfile -t cks < <(printf '%s\n' "$out"/checkpoint-step* | sort -V)
[ -d "${cks[0]}" ] || { echo "no kept checkpoints (checkpoint-step*) in $out" >&2; exit 1; }
: > "$out/floor.jsonl"
for ck in "${cks[@]}"; do
  target/release/examples/moe_floor "$ck" | tee -a "$out/floor.jsonl"
done
"$py" scripts/plot-moe-floor.py "$out" "$out/floor.png" | tee "$out/floor-summary.json"
