#!/usr/bin/env bash
# Step-time overhead of hyper-connections: plain residual vs mHC vs HC (n = HC_MULT streams) on
# the same preset, batch and sequence length, alternating the three in every round so that
# machine drift hits all equally. Reports wall-clock and CPU-time medians (CPU time, from
# /proc/self/stat, is the robust one on a shared machine) and the ratios to plain.
# Writes results/bench-mhc/<preset>-T<seq>.json and .png.
#
# Usage: scripts/bench-mhc.sh [PRESET=small] [BATCH=8] [SEQ_LEN=256] [ROUNDS=4] [THREADS=1]
# Env: ITERS (timed steps per run, default 3), HC_MULT (default 4), PYTHON (for the plot).
# MNEMO_SMOKE=1: tiny, B=1, T=32, one round of one step, into a temp dir (docs/scripts.md).
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-small}; batch=${2:-8}; seq=${3:-256}; rounds=${4:-4}; threads=${5:-1}
iters=${ITERS:-3}; n=${HC_MULT:-4}
py=${PYTHON:-reference/.venv/bin/python}
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
if [ "$smoke" = 1 ]; then
  . scripts/smoke-env.sh
  preset=tiny; batch=1; seq=32; rounds=1; threads=1; iters=1; py=$PYTHON
fi
[ "$smoke" = 1 ] || cargo build --release -q -p mnemo-cli
mnemo=target/release/mnemo
[ "$smoke" != 1 ] || mnemo=$smoke_bin
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
: > "$tmp/runs.jsonl"
for r in $(seq 1 "$rounds"); do
  for res in plain mhc hc; do
    echo "round $r/$rounds: $res" >&2
    $mnemo --threads "$threads" bench train-step --preset "$preset" --batch-size "$batch" \
      --seq-len "$seq" --set residual="$res" --set hc_mult="$n" --iters "$iters" --warmup 1 \
      >> "$tmp/runs.jsonl"
  done
done
out="results/bench-mhc/$preset-T$seq"
[ "$smoke" != 1 ] || out="$smoke_dir/bench-mhc/$preset-T$seq"
mkdir -p "$(dirname "$out")"
"$py" - "$tmp/runs.jsonl" "$out" "$preset" <<'PY'
import json, statistics, sys
runs_path, out, preset = sys.argv[1:]
runs = [json.loads(l) for l in open(runs_path) if l.strip()]
by = {k: [r for r in runs if r["residual"] == k] for k in ("plain", "mhc", "hc")}
med = lambda k, f: statistics.median(r[f] for r in by[k])
res = {
    "preset": preset, "batch": runs[0]["batch"], "seq_len": runs[0]["seq_len"],
    "threads": runs[0]["threads"], "hc_mult": by["mhc"][0]["hc_mult"],
    "params": {k: by[k][0]["params"] for k in by},
}
for k in by:
    res[f"{k}_step_ms_median"] = med(k, "step_ms_median")
    res[f"{k}_step_cpu_ms_median"] = med(k, "step_cpu_ms_median")
    res[f"{k}_rounds_ms"] = [r["step_ms_median"] for r in by[k]]
    res[f"{k}_rounds_cpu_ms"] = [r["step_cpu_ms_median"] for r in by[k]]
    res[f"{k}_phase_ms"] = by[k][len(by[k]) // 2]["phase_ms"]
for k in ("mhc", "hc"):
    res[f"{k}_overhead_wall"] = res[f"{k}_step_ms_median"] / res["plain_step_ms_median"] - 1
    res[f"{k}_overhead_cpu"] = res[f"{k}_step_cpu_ms_median"] / res["plain_step_cpu_ms_median"] - 1
json.dump(res, open(out + ".json", "w"), indent=2)
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = ["plain", f"mHC n={res['hc_mult']}", f"HC n={res['hc_mult']}"]
    vals = [res[f"{k}_step_cpu_ms_median"] for k in ("plain", "mhc", "hc")]
    bars = ax.bar(names, vals, color=["#888", "#2a7", "#c63"])
    for b, v, k in zip(bars, vals, ("plain", "mhc", "hc")):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f} ms", ha="center", va="bottom")
        ax.plot([b.get_x() + b.get_width() / 2] * len(res[f"{k}_rounds_cpu_ms"]),
                res[f"{k}_rounds_cpu_ms"], "k.", alpha=0.5)
    ax.set_ylabel("CPU time per training step (ms, median; dots = rounds)")
    ax.set_title(f"{preset}: B={res['batch']} T={res['seq_len']}, {res['threads']} thread(s)\n"
                 f"mHC +{res['mhc_overhead_cpu']:.1%}, HC +{res['hc_overhead_cpu']:.1%} CPU time vs plain "
                 f"(wall: +{res['mhc_overhead_wall']:.1%}, +{res['hc_overhead_wall']:.1%})")
    fig.tight_layout(); fig.savefig(out + ".png", dpi=100)
except ImportError:
    print("matplotlib missing: no PNG", file=sys.stderr)
print(json.dumps({k: v for k, v in res.items() if "overhead" in k or "median" in k}, indent=1))
PY
