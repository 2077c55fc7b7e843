#!/usr/bin/env bash
# Same-budget comparison of the residual kinds: plain vs HC vs mHC (n = 4), same preset, seed,
# learning-rate schedule and training tokens (the data windows come from the seed), on a real
# corpus. Writes results/mhc/<TAG>/: each run's metrics.jsonl, run.json and diagnostics PNGs,
# val_loss.png (validation loss of the three runs), amax.png (composite Amax gains of HC and
# mHC), grad_norm.png, and summary.json (final numbers, or the error of a run that diverged).
#
# Usage: scripts/mhc-compare.sh [TAG=tiny]
# Env: DATA (data/corpus), PRESET (tiny), STEPS (600), LR (2e-3), SEED (1337),
#      SETS (extra "--set k=v" flags for all three, e.g. "--set n_layers=8"), KINDS
#      ("plain hc mhc"), TOKENIZER (reuse a tokenizer.json; default: the first run trains one),
#      MNEMO_CACHE (token cache), PYTHON (matplotlib for the plots).
# MNEMO_SMOKE=1: 2 steps of 2 x 32 tokens on crates/mnemo-pack/src, into a temp dir (docs/scripts.md).
set -uo pipefail
cd "$(dirname "$0")/.."
tag=${1:-tiny}
data=${DATA:-data/corpus}; preset=${PRESET:-tiny}; steps=${STEPS:-600}; lr=${LR:-2e-3}
seed=${SEED:-1337}; sets=${SETS:-}; kinds=${KINDS:-plain hc mhc}
py=${PYTHON:-reference/.venv/bin/python}
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
runs_dir=runs
if [ "$smoke" = 1 ]; then
  . scripts/smoke-env.sh
  data=$smoke_data; preset=tiny; steps=2; sets="$sets --seq-len 32 --batch-size 2"; py=$PYTHON
fi
[ "$smoke" = 1 ] || cargo build --release -q -p mnemo-cli || exit 1
mnemo=target/release/mnemo
res=results/mhc/$tag
[ "$smoke" != 1 ] || { mnemo=$smoke_bin; res=$smoke_dir/mhc/$tag; runs_dir=$smoke_dir/runs; }
mkdir -p "$res" "$runs_dir"
tok=${TOKENIZER:-}
for kind in $kinds; do
  run=$runs_dir/mhc-$tag-$kind
  rm -rf "$run"
  echo "== $tag: $kind ($preset, $steps steps, lr $lr, seed $seed, $sets)" >&2
  start=$(date +%s)
  # shellcheck disable=SC2086
  $mnemo train --preset "$preset" --data "$data" --steps "$steps" --lr "$lr" --seed "$seed" \
    --set residual="$kind" --set eval_interval=50 $sets ${tok:+--tokenizer "$tok"} \
    --out "$run" --quiet 2> "$run.log"
  rc=$?
  end=$(date +%s)
  tail -3 "$run.log" >&2
  [ -z "$tok" ] && [ -f "$run/tokenizer.json" ] && tok="$run/tokenizer.json"
  mkdir -p "$res/$kind"
  cp "$run"/metrics.jsonl "$run"/run.json "$res/$kind/" 2>/dev/null
  cp "$run"/*.png "$res/$kind/" 2>/dev/null
  tail -5 "$run.log" > "$res/$kind/tail.log"
  echo "{\"kind\": \"$kind\", \"rc\": $rc, \"seconds\": $((end - start))}" > "$res/$kind/exit.json"
done
"$py" - "$res" "$tag" $kinds <<'PY'
import json, os, sys
res, tag, kinds = sys.argv[1], sys.argv[2], sys.argv[3:]
def rows(k):
    p = os.path.join(res, k, "metrics.jsonl")
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
summary = {"tag": tag, "runs": {}}
for k in kinds:
    m = rows(k)
    ex = json.load(open(os.path.join(res, k, "exit.json")))
    val = [(r["step"], r["val_loss"]) for r in m if "val_loss" in r]
    tr = [r for r in m if "loss" in r]
    amf = [max(r["hc_amax_fwd"]) for r in m if "hc_amax_fwd" in r]
    amb = [max(r["hc_amax_bwd"]) for r in m if "hc_amax_bwd" in r]
    s = {"exit_code": ex["rc"], "seconds": ex["seconds"], "steps_logged": tr[-1]["step"] if tr else 0,
         "final_val_loss": val[-1][1] if val else None,
         "best_val_loss": min(v for _, v in val) if val else None,
         "final_val_bpb": [r["val_bpb"] for r in m if "val_bpb" in r][-1] if val else None,
         "final_train_loss": tr[-1]["loss"] if tr else None,
         "max_grad_norm": max(r["grad_norm"] for r in tr) if tr else None,
         "max_amax_fwd": max(amf) if amf else None, "max_amax_bwd": max(amb) if amb else None,
         "final_amax_fwd": amf[-1] if amf else None, "final_amax_bwd": amb[-1] if amb else None}
    if ex["rc"] != 0:
        s["error"] = open(os.path.join(res, k, "tail.log")).read().strip()[-600:]
    summary["runs"][k] = s
    if tr:
        summary["run_config"] = json.load(open(os.path.join(res, k, "run.json")))["train"]
json.dump(summary, open(os.path.join(res, "summary.json"), "w"), indent=2)
print(json.dumps(summary["runs"], indent=1))
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
except ImportError:
    sys.exit(print("matplotlib missing: no plots (summary.json written)", file=sys.stderr))
colors = {"plain": "#777", "hc": "#c63", "mhc": "#2a7"}
fig, ax = plt.subplots(figsize=(8, 5))
for k in kinds:
    val = [(r["step"], r["val_loss"]) for r in rows(k) if "val_loss" in r]
    if val:
        fv = summary["runs"][k]["final_val_loss"]
        ax.plot(*zip(*val), "o-", color=colors[k], label=f"{k} (final {fv:.4f})")
ax.set_xlabel("step"); ax.set_ylabel("validation loss (nats/token)"); ax.grid(alpha=0.3)
ax.set_title(f"{tag}: plain vs HC vs mHC (n=4), same seed and tokens"); ax.legend()
fig.tight_layout(); fig.savefig(os.path.join(res, "val_loss.png"), dpi=100)
fig, axs = plt.subplots(1, 2, figsize=(12, 4.5))
for k in kinds:
    m = [r for r in rows(k) if "hc_amax_fwd" in r]
    if not m:
        continue
    st = [r["step"] for r in m]
    axs[0].plot(st, [r["hc_amax_fwd"][-1] for r in m], "-", color=colors[k], label=f"{k} forward")
    axs[0].plot(st, [r["hc_amax_bwd"][-1] for r in m], "--", color=colors[k], label=f"{k} backward")
    last = m[-1]
    axs[1].plot(range(len(last["hc_amax_fwd"])), last["hc_amax_fwd"], "o-", color=colors[k], label=f"{k} forward")
    axs[1].plot(range(len(last["hc_amax_bwd"])), last["hc_amax_bwd"], "s--", color=colors[k], label=f"{k} backward")
for a in axs:
    a.set_yscale("log"); a.grid(alpha=0.3); a.legend()
axs[0].set_xlabel("step"); axs[0].set_ylabel("Amax gain of the full composite prod H_res")
axs[1].set_xlabel("hyper-connection layer (attention, FFN counted separately)")
axs[1].set_ylabel("Amax gain of the composite up to the layer (last logged step)")
fig.suptitle(f"{tag}: Amax gain magnitude (mean over tokens of sequence 0)")
fig.tight_layout(); fig.savefig(os.path.join(res, "amax.png"), dpi=100)
fig, ax = plt.subplots(figsize=(8, 5))
for k in kinds:
    tr = [r for r in rows(k) if "grad_norm" in r]
    if tr:
        ax.plot([r["step"] for r in tr], [r["grad_norm"] for r in tr], color=colors[k], label=k)
ax.set_yscale("log"); ax.set_xlabel("step"); ax.set_ylabel("global gradient norm (before clipping)")
ax.grid(alpha=0.3); ax.legend(); ax.set_title(f"{tag}: gradient norm")
fig.tight_layout(); fig.savefig(os.path.join(res, "grad_norm.png"), dpi=100)
PY
