#!/usr/bin/env bash
# DeepSeek-V4 training-step speed: mnemo vs transformers 5.23.0's DeepseekV4ForCausalLM (eager,
# float32), same config (exported by mnemo), batch, sequence length and threads, alternating
# rounds; medians. mnemo is timed twice per round, interleaved step by step (`--vs-no-mtp`):
# as it trains (with the MTP block, which transformers drops) and without the MTP block (closer
# to the work transformers does; mnemo still trains the indexer by its KL loss and runs the MoE
# balancing, which transformers does not). Two configs: the `v4-tiny` preset as mnemo trains it, and a variant that
# suits transformers best (4 experts of width 256 so its default `grouped_mm` experts run,
# 3 Sinkhorn iterations as its own tests use). Each side also runs in its mixed precision: mnemo
# `--precision bf16` (bf16 GEMMs, AVX-512 BF16) against transformers under
# `torch.autocast("cpu", dtype=torch.bfloat16)`. mnemo's f32 arm prints its step profile
# (`--profile`). Writes results/v4-train-speed/{speed.json,speed.png}.
#
# Usage: scripts/bench-v4-train.sh [ROUNDS=3] [THREADS=2] [BATCH=4] [SEQ=256]
# Needs PYTHON=/path/to/python with torch and transformers==5.23.0 (reference/requirements-v4.txt)
# and matplotlib.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; threads=${2:-2}; batch=${3:-4}; seq=${4:-256}
py=${PYTHON:-reference/.venv-v4/bin/python}
cargo build --release -q -p mnemo-cli
mnemo=target/release/mnemo
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
declare -A sets experts
sets[v4-tiny]=""
experts[v4-tiny]=eager
sets[hf-friendly]="--set n_routed_experts=4 --set moe_inter=256 --set hc_sinkhorn_iters=3"
experts[hf-friendly]=grouped_mm
: > "$tmp/runs.jsonl"
for name in v4-tiny hf-friendly; do
  # shellcheck disable=SC2086
  $mnemo train --preset v4-tiny ${sets[$name]} --steps 1 --out "$tmp/$name" --data crates >/dev/null 2>&1
  $mnemo export "$tmp/$name" --format hf --out "$tmp/$name-hf" >/dev/null
  for r in $(seq 1 "$rounds"); do
    for prec in f32 bf16; do
      echo "$name round $r/$rounds: mnemo $prec" >&2
      prof=--profile
      # shellcheck disable=SC2086
      $mnemo --threads "$threads" bench train-step --preset v4-tiny ${sets[$name]} --batch-size "$batch" \
          --seq-len "$seq" --iters 5 --warmup 1 --data crates --vs-no-mtp --precision "$prec" $prof \
          | "$py" -c "import json,sys; [print(json.dumps({'config': '$name', **r})) for r in json.load(sys.stdin)]" \
          >> "$tmp/runs.jsonl"
      echo "$name round $r/$rounds: transformers $prec" >&2
      ac=none; [ "$prec" = bf16 ] && ac=bf16
      OMP_NUM_THREADS=$threads "$py" reference/bench_step_v4.py --config "$tmp/$name-hf/config.json" \
          --batch "$batch" --seq-len "$seq" --threads "$threads" --steps 3 --warmup 1 --autocast $ac \
          --experts "${experts[$name]}" 2>/dev/null | sed "s/^{/{\"config\":\"$name\",/" >> "$tmp/runs.jsonl"
    done
  done
done
mkdir -p results/v4-train-speed
"$py" - "$tmp/runs.jsonl" <<'PY'
import json, statistics, sys, subprocess
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
out = {"cpu": model, "configs": {}}
def med(v): return statistics.median(v) if v else None
for name in sorted({r["config"] for r in runs}):
    c = {}
    for prec in ["f32", "bf16"]:
        mine = [r for r in runs if r["config"] == name and r.get("precision", "f32") == prec]
        m = [r["step_ms_median"] for r in mine if r.get("label") == "mtp"]
        m0 = [r["step_ms_median"] for r in mine if r.get("label") == "no-mtp"]
        t = [r["step_ms_median"] for r in mine if r.get("impl") == "transformers"]
        first = next(r for r in mine if r.get("label") == "mtp")
        c.update({"params": first["params"], "batch": first["batch"], "seq_len": first["seq_len"],
                  "threads": first["threads"]})
        c[prec] = {
            "mnemo_step_ms": m, "transformers_step_ms": t,
            "mnemo_median_ms": med(m), "transformers_median_ms": med(t),
            "speedup": med(t) / med(m),
            "mnemo_no_mtp_step_ms": m0, "mnemo_no_mtp_median_ms": med(m0),
            "speedup_no_mtp": med(t) / med(m0),
            "mnemo_phase_ms": [r["phase_ms"] for r in mine if r.get("label") == "mtp"],
            "mnemo_profile_ms": [r["profile_ms"] for r in mine if r.get("label") == "mtp" and "profile_ms" in r],
            "mnemo_no_mtp_profile_ms": [r["profile_ms"] for r in mine if r.get("label") == "no-mtp" and "profile_ms" in r],
        }
        # The no-MTP step's matrix products against their floor (each shape timed alone with
        # the same kernel and threads), and the memory-bound work that is not a product.
        nm = [r for r in mine if r.get("label") == "no-mtp" and "gemm_floor" in r]
        if nm:
            mb = lambda p: p.get("adamw", 0) + p.get("clip", 0) + p.get("moe.balance.fit", 0)
            c[prec].update({
                "target_3x_ms": med(t) / 3,
                "no_mtp_gemm_gflop": med([r["gemm_floor"]["gflop"] for r in nm]),
                "no_mtp_gemm_in_step_ms": med([r["gemm_floor"]["in_step_ms"] for r in nm]),
                "no_mtp_gemm_floor_ms": med([r["gemm_floor"]["floor_ms"] for r in nm]),
                "no_mtp_adamw_clip_refit_ms": med([mb(r["profile_ms"]) for r in nm]),
                "no_mtp_gemm_floor_shapes": nm[0]["gemm_floor"]["shapes"],
            })
    out["configs"][name] = c
json.dump(out, open("results/v4-train-speed/speed.json", "w"), indent=1)
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
names = list(out["configs"])
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
for ax, prec in zip(axes, ["f32", "bf16"]):
    x = range(len(names))
    cs = [out["configs"][n][prec] for n in names]
    ax.bar([i - 0.27 for i in x], [c["mnemo_median_ms"] for c in cs], 0.27, label="mnemo (with MTP)")
    ax.bar([i for i in x], [c["mnemo_no_mtp_median_ms"] for c in cs], 0.27, label="mnemo (no MTP)")
    ax.bar([i + 0.27 for i in x], [c["transformers_median_ms"] for c in cs], 0.27,
           label="transformers 5.23.0" + (" (autocast bf16)" if prec == "bf16" else " (eager f32)"))
    ax.set_xticks(list(x)); ax.set_xticklabels([f"{n}\n{c['speedup']:.2f}x / {c['speedup_no_mtp']:.2f}x" for n, c in zip(names, cs)])
    ax.set_title(prec + (": mnemo --precision bf16" if prec == "bf16" else ""), fontsize=9); ax.legend(fontsize=7)
axes[0].set_ylabel("ms per training step")
fig.suptitle(f"DeepSeek-V4 training step, batch 4x256, 2 threads, {model}", fontsize=9)
fig.tight_layout(); fig.savefig("results/v4-train-speed/speed.png", dpi=120)
for n in names:
    for prec in ["f32", "bf16"]:
        c = out["configs"][n][prec]
        print(f"{n} {prec}: {out['configs'][n]['params']/1e6:.1f}M params, mnemo {c['mnemo_median_ms']:.0f} ms (no MTP {c['mnemo_no_mtp_median_ms']:.0f}), transformers {c['transformers_median_ms']:.0f} ms: {c['speedup']:.2f}x ({c['speedup_no_mtp']:.2f}x)")
        if "no_mtp_gemm_floor_ms" in c:
            print(f"  3x target {c['target_3x_ms']:.0f} ms; no-MTP products {c['no_mtp_gemm_gflop']:.1f} GFLOP: "
                  f"{c['no_mtp_gemm_in_step_ms']:.0f} ms as run, floor {c['no_mtp_gemm_floor_ms']:.0f} ms; "
                  f"AdamW + clip + bias refit {c['no_mtp_adamw_clip_refit_ms']:.0f} ms")
PY
