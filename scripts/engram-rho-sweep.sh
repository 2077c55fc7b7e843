#!/usr/bin/env bash
# Engram vs routed experts at fixed total and activated parameters (the paper's allocation sweep,
# U-shaped law). ρ = share of the sparse budget (the routed experts of `tiny-moe` at ρ = 1) kept
# as routed experts; the rest pays for Engram table rows (block 1, orders 2–3, 4 heads × 16 dims).
# top_k stays 2, so activated expert parameters are equal; the Engram gate (~68k params) is
# the only extra activated weight and is printed in the accounting.
#   STEPS=1000 TRAIN_ARGS="--batch-size 8 --set train.eval_batches=32" OUT=results/engram-rho/steps-1000 \
#     WORK=runs/exp/engram-rho-1000 MNEMO="target/release/mnemo --threads 1" scripts/engram-rho-sweep.sh
#     RHOS="1.0 0.8" SEEDS=7 ... (same, again: a second seed of ρ = 1.0 and 0.8)
#                                                 (the run committed in results/engram-rho/steps-1000:
#                                                 ~15 min per ρ on one core; two invocations
#                                                 with disjoint RHOS run side by side)
#   STEPS=2000 scripts/engram-rho-sweep.sh        (longer: hours on 2 cores)
#   STEPS=5 scripts/engram-rho-sweep.sh           (end-to-end check)
#   STEPS=100 TRAIN_ARGS="--batch-size 8 --set train.warmup_steps=20" OUT=results/engram-rho/steps-100 \
#     WORK=runs/exp/engramexp/rho nice -n 10 scripts/engram-rho-sweep.sh
#                                                 (the reduced run committed in results/engram-rho/steps-100)
# Results: OUT/{configs/*.json, rho.json, rho.png} (default OUT: results/engram-rho/steps-STEPS).
# MNEMO_SMOKE=1: ρ = 1.0 and 0.6, 2 steps on crates/mnemo-pack/src, into a temp dir (docs/scripts.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MNEMO=${MNEMO:-target/release/mnemo}
STEPS=${STEPS:-2000}
RHOS=${RHOS:-"1.0 0.8 0.6 0.4 0.2"}
WORK=${WORK:-runs/exp/engram-rho-$STEPS}
DATA=${DATA:-data/corpus}
TOK=${TOK:-runs/tiny-real/tokenizer.json}
OUT=${OUT:-results/engram-rho/steps-$STEPS}
TRAIN_ARGS=${TRAIN_ARGS:-}
SEEDS=${SEEDS:-1337}    # runs of seeds other than 1337 are named rho-X-seedS; the JSON and plot use every seed found
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
if [ "$smoke" = 1 ]; then
  . scripts/smoke-env.sh
  # ρ = 1.0 and 0.6, 2 steps of 2 x 64 tokens, the tokenizer of a 2-step stand-in for tiny-real.
  MNEMO=$smoke_bin; STEPS=2; RHOS="1.0 0.6"; WORK=$smoke_dir/work; DATA=$smoke_data
  OUT=$smoke_dir/engram-rho; TRAIN_ARGS="--batch-size 2 --seq-len 64"; SEEDS=1337
  smoke_run "$smoke_dir/init"; TOK=$smoke_dir/init/tokenizer.json
fi
mkdir -p "$OUT/configs" "$WORK"
# Write one config per ρ and its parameter accounting (python: exact formulas of the preset).
${PYTHON:-python3} - "$OUT" "$RHOS" <<'PY'
import json, sys
out, rhos = sys.argv[1], [float(r) for r in sys.argv[2].split()]
d, E0, inter, n_layers, n_dense, top_k = 256, 16, 704 // 3, 4, 1, 2
heads, head_dim, orders = 4, 16, 2                 # Engram: 4 heads/order, orders 2..3
per_expert = 3 * d * inter                         # gate, up, down
moe_layers = n_layers - n_dense
budget = E0 * per_expert * moe_layers              # the sparse budget at ρ = 1
acct = []
for rho in rhos:
    E = max(top_k + 1, round(E0 * rho))
    freed = budget - E * per_expert * moe_layers
    rows = freed // head_dim                       # table rows that cost what the experts did
    per_head = rows // (heads * orders)
    model = {"n_routed_experts": E}
    if per_head >= 2:
        model["engram"] = {"layer_ids": [1], "max_ngram_size": 3, "n_head_per_ngram": heads,
                           "head_dim": head_dim, "vocab_size_per_ngram": [per_head, per_head],
                           "kernel_size": 4, "seed": 0, "pad_id": 0}
    else:
        model["engram"] = None
    name = f"rho-{rho:.1f}"
    json.dump({"preset": "tiny-moe", "model": model}, open(f"{out}/configs/{name}.json", "w"), indent=1)
    a = {"rho": rho, "name": name, "routed_experts": E,
         "routed_expert_params": E * per_expert * moe_layers,
         "engram_table_params_target": rows * head_dim if per_head >= 2 else 0,
         "activated_routed_params": top_k * per_expert * moe_layers}
    acct.append(a)
json.dump(acct, open(f"{out}/accounting.json", "w"), indent=1)
print(f"sparse budget (ρ=1): {budget:,} params = {E0} experts x {moe_layers} layers x {per_expert:,}")
for a in acct:
    print(f"ρ={a['rho']:.1f}: {a['routed_experts']:2d} experts ({a['routed_expert_params']:,}) + Engram table "
          f"{a['engram_table_params_target']:,} (target) = {a['routed_expert_params'] + a['engram_table_params_target']:,}")
PY
for seed in $SEEDS; do
for rho in $RHOS; do
  cfgname=$(printf "rho-%.1f" "$rho")
  name=$cfgname
  [ "$seed" = 1337 ] || name="$cfgname-seed$seed"
  run="$WORK/$name"
  # Reuse a finished run: its metrics hold the final step's validation line.
  if [ ! -f "$run/metrics.jsonl" ] || ! grep "\"step\":$STEPS," "$run/metrics.jsonl" | grep -q val_loss; then
    rm -rf "$run"
    $MNEMO train --config "$OUT/configs/$cfgname.json" --data "$DATA" --tokenizer "$TOK" --steps "$STEPS" \
      --seed "$seed" --out "$run" --quiet $TRAIN_ARGS 2> "$WORK/$name.log"
  fi
  # The exact sizes as built (prime table sizes): parameters from the log and `engram inspect`.
  grep -E "^model:|engram gates" "$WORK/$name.log" | sed "s/^/$name: /" || true
  if grep -q '"engram": {' "$OUT/configs/$cfgname.json"; then
    $MNEMO engram inspect "$run" | grep -E "rows" | sed "s/^/$name: /"
  fi
done
done
${PYTHON:-python3} - "$OUT" "$WORK" "$STEPS" <<'PY'
import json, sys, re
out, work, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
acct = json.load(open(f"{out}/accounting.json"))
def num(s):
    m = re.match(r"([\d.]+)([kMG]?)", s); return float(m[1]) * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9}[m[2]]
rows = []
for a in acct:
    log = open(f"{work}/{a['name']}.log").read()
    m = re.search(r"model: (\S+) parameters, (\S+) activated", log)
    t = re.search(r"engram gates (\S+), engram tables (\S+)", log)
    val = [json.loads(l) for l in open(f"{work}/{a['name']}/metrics.jsonl") if "val_loss" in l][-1]
    tables = num(t[2]) if t else 0.0
    r = dict(a, params_flat=num(m[1]), activated=num(m[2]), engram_tables=tables,
             total_params=num(m[1]) + tables, val_loss=val["val_loss"], val_bpb=val["val_bpb"], steps=steps)
    # Other seeds of the same ρ (rho-X-seedS), when present and finished.
    import glob, os
    seeds = {"1337": val["val_loss"]}
    for d in sorted(glob.glob(f"{work}/{a['name']}-seed*")):
        rows_s = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if "val_loss" in l] if os.path.exists(f"{d}/metrics.jsonl") else []
        if rows_s and rows_s[-1]["step"] == steps:
            seeds[d.rsplit("-seed", 1)[1]] = rows_s[-1]["val_loss"]
    r["val_loss_by_seed"] = seeds
    r["val_loss_mean"] = sum(seeds.values()) / len(seeds)
    r["val_curve"] = {v["step"]: round(v["val_loss"], 4) for v in
                      (json.loads(l) for l in open(f"{work}/{a['name']}/metrics.jsonl") if "val_loss" in l)}
    rows.append(r)
    print(f"ρ={r['rho']:.1f}: total {r['total_params']/1e6:.2f}M, activated {r['activated']/1e6:.2f}M, "
          f"val loss {r['val_loss']:.4f}, bpb {r['val_bpb']:.4f}")
json.dump(rows, open(f"{out}/rho.json", "w"), indent=1)
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
except ImportError:
    sys.exit(print("matplotlib missing: no rho.png (rho.json written)", file=sys.stderr))
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot([r["rho"] for r in rows], [r["val_loss"] for r in rows], marker="o", label="seed 1337")
for r in rows:
    other = [v for k, v in r["val_loss_by_seed"].items() if k != "1337"]
    if other:
        ax.scatter([r["rho"]] * len(other), other, marker="x", color="gray", zorder=3,
                   label="other seeds" if r is rows[0] else None)
best = min(rows, key=lambda r: r["val_loss"])
ax.scatter([best["rho"]], [best["val_loss"]], color="red", zorder=3, label=f"minimum at ρ={best['rho']:.1f}")
ax.set_xlabel("ρ (share of the sparse budget given to routed experts)"); ax.set_ylabel("val loss (nats/token)")
ax.set_title(f"Engram/MoE allocation, tiny-moe, {steps} steps"); ax.invert_xaxis(); ax.grid(alpha=.3); ax.legend()
fig.tight_layout(); fig.savefig(f"{out}/rho.png", dpi=110)
PY
