#!/usr/bin/env bash
# What a second, different question costs `mnemo ask` about a repository bigger than the
# model's context: three questions with the default split (a quarter of the room for the
# question's files), then two with --question-tokens 256, all with a fresh prefix cache.
# Writes OUT/log.txt (every command, its stderr, wall and CPU time) and OUT/cache-list.txt. On a
# shared machine wall times swing with the load; the CPU times and token counts are steadier.
#
# Usage: scripts/ask-second-question.sh [MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf]
#        [REPO=crates/mnemo-pack] [OUT=results/ask-prefix-cache]
# (scripts/fetch-smollm2.sh fetches the model; `cargo build --release` builds mnemo.)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
repo=${2:-crates/mnemo-pack}
out=${3:-results/ask-prefix-cache}
mnemo=${MNEMO:-target/release/mnemo}
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
mkdir -p "$out"
: > "$out/log.txt"
ask() {
  echo "\$ mnemo --threads 2 ask $repo \"$1\" --model $model --max-tokens 64 ${*:2}" >> "$out/log.txt"
  /usr/bin/time -f "wall %e s, CPU %U s user + %S s system" "$mnemo" --threads 2 ask "$repo" "$1" --model "$model" \
    --cache-dir "$cache" --max-tokens 64 "${@:2}" 2>> "$out/log.txt" > /dev/null
  echo >> "$out/log.txt"
}
{ echo "# $(date -u +%FT%TZ), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"; echo; } >> "$out/log.txt"
ask "Where are secrets detected?"
ask "How does the token budget choose which files to keep?"
ask "Which files are skipped as generated?"
ask "Where are secrets detected?" --question-tokens 256
ask "How does the token budget choose which files to keep?" --question-tokens 256
echo "# load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$out/log.txt"
"$mnemo" cache list --cache-dir "$cache" | sed "s|$cache|CACHE|" > "$out/cache-list.txt"
sed -i "s|$cache|CACHE|g" "$out/log.txt"
cat "$out/log.txt"
