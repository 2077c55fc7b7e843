#!/usr/bin/env bash
# MoE step-time overhead: the `small-moe` preset (1 shared + 16 routed experts, top-2, expert
# width 464) against a dense model with the same *activated* FFN width ((1 + 2)·464 = 1392),
# everything else equal, alternating runs. Writes results/bench-moe/<preset>.json and .png.
#
# Usage: scripts/bench-moe.sh [PRESET=small-moe] [BATCH=8] [SEQ_LEN=256] [ROUNDS=5] [THREADS=2]
# MNEMO_SMOKE=1: tiny-moe vs its dense twin, B=1, T=32, one step, into a temp dir (docs/scripts.md).
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-small-moe}; batch=${2:-8}; seq=${3:-256}; rounds=${4:-5}; threads=${5:-2}
py=${PYTHON:-python3}
iters=${ITERS:-4}
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
if [ "$smoke" = 1 ]; then
  . scripts/smoke-env.sh
  preset=tiny-moe; batch=1; seq=32; rounds=1; threads=1; iters=1; py=$PYTHON
fi
[ "$smoke" = 1 ] || cargo build --release -q -p mnemo-cli
mnemo=target/release/mnemo
[ "$smoke" != 1 ] || mnemo=$smoke_bin
base=${preset%-moe}
width=$($mnemo config --preset "$preset" | "$py" -c 'import json,sys; m=json.load(sys.stdin)["model"]; print((m["n_shared_experts"]+m["top_k"])*m["moe_inter"])')
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds" >&2
  $mnemo --threads "$threads" bench train-step --preset "$preset" --batch-size "$batch" --seq-len "$seq" \
      --iters "$iters" --warmup 1 | sed 's/^{/{"variant":"moe",/' >> "$tmp"
  $mnemo --threads "$threads" bench train-step --preset "$base" --set ffn_hidden="$width" --batch-size "$batch" \
      --seq-len "$seq" --iters "$iters" --warmup 1 | sed 's/^{/{"variant":"dense",/' >> "$tmp"
done
out="results/bench-moe/$preset"
[ "$smoke" != 1 ] || out="$smoke_dir/bench-moe/$preset"
mkdir -p "$(dirname "$out")"
"$py" - "$tmp" "$out" "$preset" "$width" <<'PY'
import json, statistics, sys
path, out, preset, width = sys.argv[1:]
runs = [json.loads(l) for l in open(path) if l.strip()]
def med(v, key): return statistics.median(r[key] for r in runs if r["variant"] == v)
def phase(v, p): return statistics.median(r["phase_ms"][p] for r in runs if r["variant"] == v)
moe, dense = med("moe", "step_ms_median"), med("dense", "step_ms_median")
res = {"preset": preset, "dense_ffn_hidden": int(width),
       "moe_params": next(r["params"] for r in runs if r["variant"] == "moe"),
       "dense_params": next(r["params"] for r in runs if r["variant"] == "dense"),
       "batch": runs[0]["batch"], "seq_len": runs[0]["seq_len"], "threads": runs[0]["threads"],
       "moe_step_ms_median": moe, "dense_step_ms_median": dense, "moe_over_dense": moe / dense,
       "phase_ms": {v: {p: phase(v, p) for p in ["forward", "backward", "optimizer"]} for v in ["moe", "dense"]},
       "moe_rounds_ms": [r["step_ms_median"] for r in runs if r["variant"] == "moe"],
       "dense_rounds_ms": [r["step_ms_median"] for r in runs if r["variant"] == "dense"]}
json.dump(res, open(out + ".json", "w"), indent=2)
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [f"MoE ({res['moe_params']/1e6:.0f}M total)", f"dense, same activated ({res['dense_params']/1e6:.0f}M)"]
    bottoms = [0, 0]
    for p, c in [("forward", "#4a8"), ("backward", "#48c"), ("optimizer", "#c84")]:
        vals = [res["phase_ms"]["moe"][p], res["phase_ms"]["dense"][p]]
        ax.bar(names, vals, bottom=bottoms, label=p, color=c)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_ylabel("training step (ms, median)")
    ax.set_title(f"{preset}: MoE step = {res['moe_over_dense']:.2f}x dense (B={res['batch']}, T={res['seq_len']}, {res['threads']} threads)")
    ax.legend(); fig.tight_layout(); fig.savefig(out + ".png", dpi=100)
except ImportError:
    print("matplotlib missing: no PNG", file=sys.stderr)
print(json.dumps({k: res[k] for k in ["moe_step_ms_median", "dense_step_ms_median", "moe_over_dense", "phase_ms"]}, indent=1))
PY
