#!/usr/bin/env bash
# DeepSeek-V4 at V4-Flash's real layer shapes on this machine (issue 20, item 5): a random
# packed checkpoint (FP8 + FP4 experts; hidden 4096, 64 heads x 512, q_lora 1024, o_lora 1024
# in 8 groups, experts of width 2048 top-6 + 1 shared, window 128, CSA 4 / index top-512,
# HCA 128, hc_mult 4, vocab 129280) with LAYERS layers and EXPERTS experts, loaded packed and
# memory-mapped (`io::v4_packed`), measured at each context: prefill tok/s, decode ms/token,
# KV-cache bytes per token, weight bytes read per token, resident memory.
#
# Contexts up to EXACT_MAX are prefilled exactly; longer ones start from a synthetic cache of
# the exact sizes (`KvCache::fill_synthetic`, benchmark only) and time one 256-token prefill
# chunk at that depth (the marginal prefill rate there) and the decoding after it.
#
# Writes results/v4-scale/: run.json (raw), summary.json (per context + the full V4-Flash
# model), v4-scale.png, machine.txt. The checkpoint (~12.4 GB at the defaults) goes to
# MODEL_DIR, outside the repository, and is written only when absent.
#
# Usage: scripts/v4-scale.sh
# Env: MODEL_DIR (/work/v4flash-scale), LAYERS (3), EXPERTS (256), CONTEXTS
#      (512,4096,131072,1048576), EXACT_MAX (512), DECODE (4), LOCK (a lock file to hold during
#      the timing run, e.g. /tmp/mnemo-cargo.lock), PYTHON (with matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${MODEL_DIR:-/work/v4flash-scale}
layers=${LAYERS:-3}; experts=${EXPERTS:-256}
contexts=${CONTEXTS:-512,4096,131072,1048576}; exact=${EXACT_MAX:-512}; decode=${DECODE:-4}
py=${PYTHON:-python3}
res=results/v4-scale
mkdir -p "$res"
cargo build --release -q -p mnemo-cli
mnemo=target/release/mnemo
case "$(realpath -m "$model")" in "$(realpath .)"/*) echo "MODEL_DIR must be outside the repository" >&2; exit 1;; esac
if [ ! -f "$model/model.safetensors.index.json" ]; then
  nice -n 19 $mnemo v4-scale write "$model" --layers "$layers" --experts "$experts"
fi
{ lscpu | grep -E 'Model name|^CPU\(s\)|Thread|L3'; grep MemTotal /proc/meminfo; uptime; } > "$res/machine.txt"
run=($mnemo v4-scale run "$model" --contexts "$contexts" --exact-max "$exact" --decode "$decode" --out "$res/run.json")
if [ -n "${LOCK:-}" ]; then flock "$LOCK" "${run[@]}"; else "${run[@]}"; fi 2>&1 | tee "$res/run.log"
uptime >> "$res/machine.txt"
$py scripts/v4_scale_report.py "$res"
