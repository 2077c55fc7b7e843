#!/usr/bin/env bash
# A mnemo-trained DeepSeek-V4 model in transformers: train v4-tiny for 30 steps on this
# repository's engine sources, export it (`mnemo export --format hf`), and compare mnemo's
# logits with transformers 5.23.0's on 63 and 100 random ids. Writes results/v4-roundtrip/.
#
# Usage: PYTHON=<python with reference/requirements-v4.txt> scripts/v4-roundtrip.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-reference/.venv-v4/bin/python}
cargo build --release -q -p mnemo-cli
mnemo=target/release/mnemo
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
out=results/v4-roundtrip
mkdir -p "$out"
$mnemo train --preset v4-tiny --data crates/mnemo/src --steps 30 --seq-len 128 --batch-size 8 \
  --out "$tmp/run" >&2
$mnemo export "$tmp/run" --format hf --out "$tmp/hf" >&2
: > "$out/roundtrip.jsonl"
for n in 63 100; do
  python3 -c "import json, random; random.seed(1); print(json.dumps([random.randrange(4096) for _ in range($n)]))" > "$out/ids$n.json"
  $mnemo logits "$tmp/hf" --ids-file "$out/ids$n.json" --out "$tmp/logits$n.safetensors" >&2
  "$py" reference/v4_roundtrip.py "$tmp/hf" "$out/ids$n.json" "$tmp/logits$n.safetensors" >> "$out/roundtrip.jsonl" || true
done
cat "$out/roundtrip.jsonl"
