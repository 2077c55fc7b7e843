#!/usr/bin/env bash
# Speed before and after a change of the model layer: two mnemo binaries, alternating rounds,
# medians. Measures what the one-block rebuild must not slow down:
#   - the training step of `small` (batch 8 x 256; what scripts/bench-train.sh times),
#   - the training step of `small-moe` and of its dense same-activated twin (scripts/bench-moe.sh),
#   - prefill and decode of a GGUF at 1 and 2 threads (what scripts/bench-llamacpp.py times),
#   - plain and lookup greedy decoding of a chat edit task (scripts/lookup-bench.py's lookup run).
# Writes results/rebuild-speed/{runs.jsonl,summary.json,speed.png}.
#
# Usage: scripts/bench-rebuild.sh BASE_BIN NEW_BIN [ROUNDS=5] [GGUF=models/SmolLM2-135M-Instruct.Q4_1.gguf]
#   BASE_BIN: e.g. a release build of the previous commit:
#     git worktree add /tmp/base <rev> && cargo build --release -p mnemo-cli \
#       --manifest-path /tmp/base/Cargo.toml --target-dir /tmp/base-target
#   PYTHON: a python with matplotlib for the plot (default python3; the plot is skipped without it).
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1; new=$2; rounds=${3:-5}; gguf=${4:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
py=${PYTHON:-python3}
out=results/rebuild-speed
mkdir -p "$out"
runs="$out/runs.jsonl"
: > "$runs"
[ -f "$gguf" ] || { echo "no GGUF at $gguf: run scripts/fetch-smollm2.sh" >&2; exit 1; }
tag() { sed "s/^{/{\"bin\":\"$1\",\"bench\":\"$2\",/"; }
one() { # BIN_NAME BIN
  local name=$1 bin=$2
  "$bin" --threads 2 bench train-step --preset small --batch-size 8 --seq-len 256 --iters 5 \
    --warmup 2 | tag "$name" train-small >> "$runs"
  "$bin" --threads 2 bench train-step --preset small-moe --batch-size 8 --seq-len 256 --iters 4 \
    --warmup 1 | tag "$name" train-small-moe >> "$runs"
  "$bin" --threads 2 bench train-step --preset small --set ffn_hidden=1392 --batch-size 8 \
    --seq-len 256 --iters 4 --warmup 1 | tag "$name" train-small-dense-1392 >> "$runs"
  for t in 1 2; do
    "$bin" --threads "$t" bench decode "$gguf" --prompt-tokens 128 --gen 32 | tag "$name" "decode-t$t" >> "$runs"
  done
  "$bin" bench lookup "$gguf" --prompt-file scripts/data/edit-task.txt --chat --max-tokens 200 \
    --reps 1 2>/dev/null | tr -d '\n' | tag "$name" lookup >> "$runs"
  echo >> "$runs"
}
for r in $(seq 1 "$rounds"); do
  # Alternate which binary goes first.
  if [ $((r % 2)) -eq 1 ]; then order="base new"; else order="new base"; fi
  for w in $order; do
    echo "round $r/$rounds: $w" >&2
    if [ "$w" = base ]; then one base "$base"; else one new "$new"; fi
  done
done
"$py" - "$runs" "$out" <<'PY'
import json, statistics, subprocess, sys
runs_path, out = sys.argv[1:]
runs = [json.loads(l) for l in open(runs_path) if l.strip()]
def metric(r):
    b = r["bench"]
    if b.startswith("train"):
        return {"step_ms": r["step_ms_median"]}
    if b.startswith("decode"):
        return {"prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"]}
    return {"plain_tok_s": r["plain"]["tok_s"], "lookup_tok_s": r["lookup"]["tok_s"]}
summary = {"cpu": subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"],
                                 capture_output=True, text=True).stdout.strip(), "rows": []}
for bench in dict.fromkeys(r["bench"] for r in runs):
    med = {}
    for w in ("base", "new"):
        ms = [metric(r) for r in runs if r["bench"] == bench and r["bin"] == w]
        med[w] = {k: statistics.median(m[k] for m in ms) for k in ms[0]}
        med[w + "_rounds"] = {k: [m[k] for m in ms] for k in ms[0]}
    for k in med["base"]:
        b, n = med["base"][k], med["new"][k]
        # new/base as a speed ratio: > 1 is faster (times inverted).
        speed = b / n if k.endswith("_ms") else n / b
        summary["rows"].append({"bench": bench, "metric": k, "base": b, "new": n,
                                "speed_new_over_base": speed,
                                "base_rounds": med["base_rounds"][k], "new_rounds": med["new_rounds"][k]})
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
for r in summary["rows"]:
    print(f"{r['bench']:24s} {r['metric']:14s} base {r['base']:9.2f}  new {r['new']:9.2f}  speed x{r['speed_new_over_base']:.3f}")
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
except ImportError:
    print("(no matplotlib: plot skipped)", file=sys.stderr); sys.exit(0)
rows = summary["rows"]
fig, ax = plt.subplots(figsize=(9, 4))
ax.barh([f"{r['bench']} {r['metric']}" for r in rows], [r["speed_new_over_base"] for r in rows])
ax.axvline(1.0, color="k", lw=1); ax.axvline(0.95, color="r", ls="--", lw=1, label="-5% (defect)")
ax.set_xlabel("speed after / before (median of alternating rounds; > 1 faster)")
ax.set_title(f"one-block rebuild: speed after/before ({summary['cpu']})"); ax.legend()
fig.tight_layout(); fig.savefig(f"{out}/speed.png", dpi=120)
PY
