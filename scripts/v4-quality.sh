#!/usr/bin/env bash
# DeepSeek-V4 (`v4-small`) against mnemo's V3.2-style models of similar size (`small-dsa`,
# `small-moe`) on the real corpus, for the same training tokens: same tokenizer, seed (hence the
# same data windows), batch, sequence length, steps and learning-rate schedule. Validation loss
# is the main model's next-token cross-entropy on the same held-out windows (v4-small's MTP
# loss is logged apart and not in it). Writes results/v4-quality/: each run's metrics.jsonl and
# run.json, val_loss.png (the three curves), summary.json (final and per-eval numbers, wall time).
#
# Usage: scripts/v4-quality.sh
# Env: DATA (data/corpus, from scripts/fetch-corpus.sh), STEPS (300), BATCH (8), SEQ (256),
#      SEED (1337), EVAL (25: steps between evaluations), PRESETS ("small-dsa small-moe v4-small"),
#      TOKENIZER (reuse a tokenizer.json; default: the first run trains one),
#      PYTHON (with matplotlib, for the plot; without it the plot is skipped).
# MNEMO_SMOKE=1: tiny-dsa, tiny-moe, v4-tiny, 2 steps of 2 x 32 tokens on crates/mnemo-pack/src,
# into a temp dir (docs/scripts.md).
set -uo pipefail
cd "$(dirname "$0")/.."
data=${DATA:-data/corpus}; steps=${STEPS:-300}; batch=${BATCH:-8}; seq=${SEQ:-256}
seed=${SEED:-1337}; every=${EVAL:-25}; presets=${PRESETS:-small-dsa small-moe v4-small}
py=${PYTHON:-reference/.venv/bin/python}
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
runs_dir=runs
if [ "$smoke" = 1 ]; then
  . scripts/smoke-env.sh
  data=$smoke_data; steps=2; batch=2; seq=32; every=1; presets="tiny-dsa tiny-moe v4-tiny"; py=$PYTHON
fi
[ -d "$data" ] || { echo "no corpus at $data: run scripts/fetch-corpus.sh $data first" >&2; exit 1; }
[ "$smoke" = 1 ] || cargo build --release -q -p mnemo-cli || exit 1
mnemo=target/release/mnemo
res=results/v4-quality
[ "$smoke" != 1 ] || { mnemo=$smoke_bin; res=$smoke_dir/v4-quality; runs_dir=$smoke_dir/runs; }
mkdir -p "$res" "$runs_dir"
tok=${TOKENIZER:-}
for preset in $presets; do
  run=$runs_dir/v4q-$preset
  rm -rf "$run"
  echo "== $preset: $steps steps of $batch x $seq tokens, seed $seed" >&2
  start=$(date +%s)
  $mnemo train --preset "$preset" --data "$data" --steps "$steps" --batch-size "$batch" \
    --seq-len "$seq" --seed "$seed" --set train.eval_interval="$every" \
    ${tok:+--tokenizer "$tok"} --out "$run" --quiet 2> "$run.log"
  rc=$?
  end=$(date +%s)
  tail -3 "$run.log" >&2
  [ -z "$tok" ] && [ -f "$run/tokenizer.json" ] && tok="$run/tokenizer.json"
  mkdir -p "$res/$preset"
  cp "$run"/metrics.jsonl "$run"/run.json "$res/$preset/" 2>/dev/null
  echo "{\"preset\": \"$preset\", \"rc\": $rc, \"seconds\": $((end - start))}" > "$res/$preset/exit.json"
done
"$py" - "$res" $presets <<'PY'
import json, os, subprocess, sys
res, presets = sys.argv[1], sys.argv[2:]
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
summary = {"cpu": model, "runs": {}}
curves = {}
for p in presets:
    d = os.path.join(res, p)
    rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    ex = json.load(open(os.path.join(d, "exit.json")))
    run = json.load(open(os.path.join(d, "run.json")))
    curves[p] = val
    summary["runs"][p] = {
        "rc": ex["rc"], "seconds": ex["seconds"],
        "tokens": max(r.get("tokens", 0) for r in rows),
        "val_loss": val, "final_val_loss": val[-1][1] if val else None,
        "final_val_bpb": next((r["val_bpb"] for r in reversed(rows) if "val_bpb" in r), None),
        "params": run.get("params"), "active_params": run.get("active_params"),
    }
json.dump(summary, open(os.path.join(res, "summary.json"), "w"), indent=1)
for p, s in summary["runs"].items():
    print(f"{p}: val loss {s['final_val_loss']}, {s['seconds']} s, rc {s['rc']}")
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
except ImportError:
    sys.exit(print("matplotlib missing: no val_loss.png", file=sys.stderr))
fig, ax = plt.subplots(figsize=(6.5, 4))
for p, val in curves.items():
    ax.plot([s for s, _ in val], [v for _, v in val], marker="o", ms=3, label=p)
ax.set_xlabel("step (same tokens for every run)"); ax.set_ylabel("validation loss (nats/token)")
ax.set_title(f"v4-small vs small-dsa / small-moe, real corpus\n{model}", fontsize=9)
ax.grid(alpha=0.3); ax.legend(); fig.tight_layout()
fig.savefig(os.path.join(res, "val_loss.png"), dpi=120)
PY
