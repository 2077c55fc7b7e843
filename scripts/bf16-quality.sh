#!/usr/bin/env bash
# bf16 mixed precision against f32 in training quality: the same preset, seed (hence the same
# data windows), tokenizer, batch and steps, once with `--precision f32` and once with
# `--precision bf16`; validation loss curves side by side. Writes results/bf16-quality/<preset>/:
# each run's metrics.jsonl and run.json, summary.json (per-eval values, final gap, wall time),
# val_loss.png.
#
# Usage: scripts/bf16-quality.sh [PRESET=tiny]
# Env: DATA (data/corpus, from scripts/fetch-corpus.sh), STEPS (600), SEED (1), EVAL (50),
#      TOKENIZER (a tokenizer.json to reuse; default: the f32 run trains one and bf16 reuses it),
#      PYTHON (with matplotlib for the plot), PRECISIONS ("f32 bf16"; e.g. "bf16" to rerun one
#      arm after a change to it, keeping the other's results in results/; pass the other run's
#      TOKENIZER, runs/bf16q-PRESET-f32/tokenizer.json).
set -uo pipefail
cd "$(dirname "$0")/.."
preset=${1:-tiny}
data=${DATA:-data/corpus}; steps=${STEPS:-600}; seed=${SEED:-1}; every=${EVAL:-50}
py=${PYTHON:-python3}
[ -d "$data" ] || { echo "no corpus at $data: run scripts/fetch-corpus.sh $data first" >&2; exit 1; }
cargo build --release -q -p mnemo-cli || exit 1
mnemo=target/release/mnemo
res=results/bf16-quality/$preset
mkdir -p "$res" runs
tok=${TOKENIZER:-}
for prec in ${PRECISIONS:-f32 bf16}; do
  run=runs/bf16q-$preset-$prec
  rm -rf "$run"
  echo "== $preset $prec: $steps steps, seed $seed" >&2
  start=$(date +%s)
  $mnemo train --preset "$preset" --data "$data" --steps "$steps" --seed "$seed" \
    --precision "$prec" --set train.eval_interval="$every" \
    ${tok:+--tokenizer "$tok"} --out "$run" --quiet 2> "$run.log"
  rc=$?
  end=$(date +%s)
  tail -2 "$run.log" >&2
  [ -z "$tok" ] && [ -f "$run/tokenizer.json" ] && tok="$run/tokenizer.json"
  mkdir -p "$res/$prec"
  cp "$run"/metrics.jsonl "$run"/run.json "$res/$prec/" 2>/dev/null
  echo "{\"precision\": \"$prec\", \"rc\": $rc, \"seconds\": $((end - start))}" > "$res/$prec/exit.json"
done
"$py" - "$res" "$preset" <<'PY'
import json, os, subprocess, sys
res, preset = sys.argv[1:]
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
out = {"cpu": model, "preset": preset, "runs": {}}
for p in ["f32", "bf16"]:
    rows = [json.loads(l) for l in open(os.path.join(res, p, "metrics.jsonl"))]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    ex = json.load(open(os.path.join(res, p, "exit.json")))
    out["runs"][p] = {"val": val, "final_val_loss": val[-1][1] if val else None, **ex}
f, b = out["runs"]["f32"]["final_val_loss"], out["runs"]["bf16"]["final_val_loss"]
out["final_gap_nats"] = None if f is None or b is None else b - f
json.dump(out, open(os.path.join(res, "summary.json"), "w"), indent=1)
print(json.dumps({k: out[k] for k in ["preset", "final_gap_nats"]}),
      {p: (r["final_val_loss"], r["seconds"]) for p, r in out["runs"].items()})
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
except ImportError:
    sys.exit(0)
fig, ax = plt.subplots(figsize=(6, 4))
for p, r in out["runs"].items():
    ax.plot([s for s, _ in r["val"]], [v for _, v in r["val"]], marker=".", label=f"{p} ({r['seconds']} s)")
ax.set_xlabel("step"); ax.set_ylabel("validation loss (nats/token)"); ax.legend()
ax.set_title(f"{preset}: f32 vs --precision bf16, same seed and data, {model}", fontsize=8)
fig.tight_layout(); fig.savefig(os.path.join(res, "val_loss.png"), dpi=120)
PY
