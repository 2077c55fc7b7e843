#!/usr/bin/env bash
# DeepSeek-V4 speculative decoding on a trained model: plain greedy vs MTP drafts (K = 1, 2, 3)
# vs lookup-first drafts, alternating arms within each round, medians (`mnemo bench speculate`:
# every arm's output must equal plain greedy). Also the time of one cached forward over 1–8
# rows (`mnemo bench rows`: what a verification pass costs against one decode step).
# Writes results/v4-speculate/{speculate.json,rows.json,speculate.png}.
#
# Usage: scripts/bench-speculate.sh [RUN=runs/v4q-v4-small] [ROUNDS=3] [TOKENS=128] [THREADS=2]
# RUN is a trained DeepSeek-V4 run with an MTP block: scripts/v4-quality.sh leaves
# runs/v4q-v4-small. Needs PYTHON with matplotlib for the plot (the JSON needs none).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/v4q-v4-small}; rounds=${2:-3}; tokens=${3:-128}; threads=${4:-2}
py=${PYTHON:-python3}
[ -d "$run" ] || { echo "no run directory $run (scripts/v4-quality.sh trains runs/v4q-v4-small)" >&2; exit 1; }
cargo build --release -q -p mnemo-cli
mnemo=target/release/mnemo
out=results/v4-speculate
mkdir -p "$out"
$mnemo --threads "$threads" bench rows "$run" --rows 1,2,3,4,6,8 --reps 7 > "$out/rows.json"
$mnemo --threads "$threads" bench speculate "$run" --max-tokens "$tokens" --rounds "$rounds" \
    --draft-len 1,2,3 \
    --prompt 'fn parse_args(args: &[String]) -> Result<Config, String> {' \
    --prompt 'impl Iterator for Counter {
    type Item = u32;' \
    --prompt 'pub fn word_count(text: &str) -> HashMap<String, usize> {' \
    --prompt '#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {' > "$out/speculate.json"
"$py" - "$out" <<'PY'
import json, subprocess, sys
out = sys.argv[1]
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
s = json.load(open(f"{out}/speculate.json"))
s["cpu"] = model
json.dump(s, open(f"{out}/speculate.json", "w"), indent=1)
print(json.dumps(s)[:2000])
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
except ImportError:
    sys.exit(0)
arms = s["arms"]
fig, ax = plt.subplots(figsize=(6, 3.5))
names = list(arms)
ax.bar(names, [arms[n]["tok_s"] for n in names])
for i, n in enumerate(names):
    acc = arms[n].get("acceptance_rate")
    label = f"{arms[n]['speedup_vs_plain']:.2f}x" + (f"\nkept {acc:.0%}" if isinstance(acc, float) else "")
    ax.text(i, arms[n]["tok_s"], label, ha="center", va="bottom", fontsize=7)
ax.set_ylabel("decode tokens/s (median)")
ax.set_title(f"v4-small: speculative decoding (identical greedy output), {model}", fontsize=8)
fig.tight_layout(); fig.savefig(f"{out}/speculate.png", dpi=120)
PY
