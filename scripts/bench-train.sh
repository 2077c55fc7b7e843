#!/usr/bin/env bash
# Training-step benchmark: mnemo vs the PyTorch reference (eager, SDPA attention), same model
# config, batch, sequence length and thread count, alternating runs so that machine drift hits
# both equally; then both again in mixed precision (mnemo `--precision bf16` against PyTorch under
# `torch.autocast("cpu", dtype=torch.bfloat16)`), same rounds. Writes
# results/bench-train/<preset>-T<seq>.json and .png, prints a summary. PRECISIONS=f32 skips bf16.
#
# Usage: scripts/bench-train.sh [PRESET=small] [BATCH=8] [SEQ_LEN=256] [ROUNDS=5] [THREADS=2]
# Needs the reference venv (reference/README.md) or PYTHON=/path/to/python with torch.
# OUT=/tmp/x writes /tmp/x.json and .png instead (a quick check: ITERS=1 OUT=/tmp/x
# scripts/bench-train.sh tiny 2 64 1).
set -euo pipefail
cd "$(dirname "$0")/.."
preset=${1:-small}; batch=${2:-8}; seq=${3:-256}; rounds=${4:-5}; threads=${5:-2}
py=${PYTHON:-reference/.venv/bin/python}
iters=${ITERS:-5}
cargo build --release -q -p mnemo-cli
mnemo=target/release/mnemo
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$mnemo config --preset "$preset" --batch-size "$batch" --seq-len "$seq" \
  | "$py" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["model"]))' > "$tmp/model.json"
echo "measuring the GEMM peak (1024^3, $threads threads)…" >&2
# The first GEMM run after idle can read low (clock ramp): one untimed run first.
$mnemo --threads "$threads" bench gemm --size 1024 --iters 20 > /dev/null
$mnemo --threads "$threads" bench gemm --size 1024 --iters 20 > "$tmp/gemm.json"
$mnemo --threads "$threads" bench gemm --size 1024 --iters 20 --precision bf16 > "$tmp/gemm-bf16.json"
precisions=${PRECISIONS:-f32 bf16}
: > "$tmp/runs.jsonl"
for r in $(seq 1 "$rounds"); do
  for prec in $precisions; do
    echo "round $r/$rounds: mnemo $prec" >&2
    $mnemo --threads "$threads" bench train-step --preset "$preset" --batch-size "$batch" --seq-len "$seq" \
        --iters "$iters" --warmup 2 --precision "$prec" >> "$tmp/runs.jsonl"
    echo "round $r/$rounds: pytorch $prec" >&2
    ac=none; [ "$prec" = bf16 ] && ac=bf16
    OMP_NUM_THREADS=$threads "$py" reference/bench_step.py --config "$tmp/model.json" --batch "$batch" \
        --seq-len "$seq" --threads "$threads" --steps "$iters" --warmup 2 --autocast $ac >> "$tmp/runs.jsonl"
  done
done
out=${OUT:-results/bench-train/$preset-T$seq}
mkdir -p "$(dirname "$out")"
"$py" - "$tmp/runs.jsonl" "$tmp/gemm.json" "$tmp/model.json" "$out" "$preset" "$tmp/gemm-bf16.json" <<'PY'
import json, statistics, sys
runs_path, gemm_path, model_path, out, preset, gemm16_path = sys.argv[1:]
runs = [json.loads(l) for l in open(runs_path) if l.strip()]
gemm = json.load(open(gemm_path))
gemm16 = json.load(open(gemm16_path))
model = json.load(open(model_path))
prec = lambda r: r.get("precision", "f32")
m = [r for r in runs if r.get("implementation") == "mnemo" and prec(r) == "f32"]
p = [r for r in runs if r.get("impl") == "pytorch" and prec(r) == "f32"]
m16 = [r for r in runs if r.get("implementation") == "mnemo" and prec(r) == "bf16"]
p16 = [r for r in runs if r.get("impl") == "pytorch" and prec(r) == "bf16"]
mm = statistics.median(r["step_ms_median"] for r in m)
pm = statistics.median(r["step_ms_median"] for r in p)
gflop = m[0]["gflop_per_step"]
res = {
    "preset": preset, "model": model, "batch": m[0]["batch"], "seq_len": m[0]["seq_len"],
    "threads": m[0]["threads"], "params": m[0]["params"], "torch": p[0].get("torch"),
    "gflop_per_step": gflop, "gemm_peak_gflops": gemm["gflops_median"],
    "mnemo_step_ms_median": mm, "pytorch_step_ms_median": pm,
    "speedup_vs_pytorch": pm / mm,
    "mnemo_mfu": gflop / (mm / 1e3) / gemm["gflops_median"],
    "pytorch_mfu": gflop / (pm / 1e3) / gemm["gflops_median"],
    "mnemo_phase_ms": m[len(m) // 2]["phase_ms"],
    "mnemo_rounds_ms": [r["step_ms_median"] for r in m],
    "pytorch_rounds_ms": [r["step_ms_median"] for r in p],
}
if m16 and p16:
    mm16 = statistics.median(r["step_ms_median"] for r in m16)
    pm16 = statistics.median(r["step_ms_median"] for r in p16)
    res.update({
        "gemm_peak_bf16_gflops": gemm16["gflops_median"],
        "mnemo_bf16_step_ms_median": mm16, "pytorch_autocast_step_ms_median": pm16,
        "speedup_bf16_vs_autocast": pm16 / mm16,
        "mnemo_bf16_mfu_of_bf16_peak": gflop / (mm16 / 1e3) / gemm16["gflops_median"],
        "mnemo_bf16_phase_ms": m16[len(m16) // 2]["phase_ms"],
        "mnemo_bf16_rounds_ms": [r["step_ms_median"] for r in m16],
        "pytorch_autocast_rounds_ms": [r["step_ms_median"] for r in p16],
    })
json.dump(res, open(out + ".json", "w"), indent=2)
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = ["mnemo f32", f"PyTorch {res['torch']} f32"]
    vals = [mm, pm]
    rounds_ = [res["mnemo_rounds_ms"], res["pytorch_rounds_ms"]]
    if "mnemo_bf16_step_ms_median" in res:
        names += ["mnemo bf16", "PyTorch autocast bf16"]
        vals += [res["mnemo_bf16_step_ms_median"], res["pytorch_autocast_step_ms_median"]]
        rounds_ += [res["mnemo_bf16_rounds_ms"], res["pytorch_autocast_rounds_ms"]]
    bars = ax.bar(names, vals, color=["#2a7", "#c63", "#5c9", "#e96"][: len(vals)])
    for b, v, rr in zip(bars, vals, rounds_):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f} ms", ha="center", va="bottom")
        ax.plot([b.get_x() + b.get_width() / 2] * len(rr), rr, "k.", alpha=0.5)
    ax.set_ylabel("training step (ms, median; dots = rounds)")
    ax.set_title(f"{preset}: B={res['batch']} T={res['seq_len']}, {res['threads']} threads, "
                 f"{res['params']/1e6:.1f}M params\nf32: mnemo {res['speedup_vs_pytorch']:.2f}x PyTorch, "
                 f"MFU {res['mnemo_mfu']:.0%} vs {res['pytorch_mfu']:.0%}"
                 + (f"; bf16: {res['speedup_bf16_vs_autocast']:.2f}x autocast" if "speedup_bf16_vs_autocast" in res else ""),
                 fontsize=9)
    fig.tight_layout(); fig.savefig(out + ".png", dpi=100)
except ImportError:
    print("matplotlib missing: no PNG", file=sys.stderr)
keys = ["mnemo_step_ms_median", "pytorch_step_ms_median", "speedup_vs_pytorch", "mnemo_mfu", "pytorch_mfu", "gflop_per_step", "gemm_peak_gflops",
        "mnemo_bf16_step_ms_median", "pytorch_autocast_step_ms_median", "speedup_bf16_vs_autocast", "gemm_peak_bf16_gflops"]
print(json.dumps({k: res[k] for k in keys if k in res}, indent=1))
PY
