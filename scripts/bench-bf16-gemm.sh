#!/usr/bin/env bash
# The bf16 GEMM alone: mnemo's `kernels::bf16::gemm` (example `bench_bf16_gemm`, f32 output)
# against `torch.matmul` on bf16 tensors (oneDNN, bf16 output), same threads, alternating
# rounds, at 1024^3 and at the `small` training step's products (B=8, T=256: 2048 tokens,
# d=512, FFN 1408, vocab 8192) in the three layouts the step uses: `nt` forward x·Wᵀ, `nn`
# input gradient dy·W, `tn` weight gradient dyᵀ·x. Also the f32 and bf16 1024^3 peaks of
# `mnemo bench gemm`. Writes results/bf16-gemm/gemm.json, prints a table.
#
# Usage: scripts/bench-bf16-gemm.sh [ROUNDS=3] [THREADS=2]   (PYTHON=/path/to/python with torch;
# OUT=/tmp/x writes /tmp/x.json instead; ITERS=10 timed runs per shape and round)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; threads=${2:-2}
py=${PYTHON:-reference/.venv/bin/python}
iters=${ITERS:-10}
cargo build --release -q -p mnemo-cli -p mnemo --example bench_bf16_gemm
shapes=${SHAPES:-"1024x1024x1024:nn
2048x512x2816:nt 2048x2816x512:nn 2816x2048x512:tn
2048x1408x512:nt 2048x512x1408:nn 512x2048x1408:tn
2048x512x8192:nt 2048x8192x512:nn 8192x2048x512:tn
2048x512x1024:nt 2048x1024x512:nn 1024x2048x512:tn
2048x512x512:nt 2048x512x512:nn 512x2048x512:tn"}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
: > "$tmp/runs.jsonl"
for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds: mnemo" >&2
  target/release/mnemo --threads "$threads" bench gemm --size 1024 --iters 20 \
    | sed "s/^{/{\"round\":$r,\"impl\":\"mnemo-f32-peak\",/" >> "$tmp/runs.jsonl"
  # shellcheck disable=SC2086
  target/release/examples/bench_bf16_gemm --threads "$threads" --iters "$iters" $shapes \
    | sed "s/^{/{\"round\":$r,/" >> "$tmp/runs.jsonl"
  echo "round $r/$rounds: pytorch" >&2
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$threads "$py" reference/bench_bf16_gemm.py --threads "$threads" --iters "$iters" $shapes \
    | sed "s/^{/{\"round\": $r, /" >> "$tmp/runs.jsonl"
done
out=${OUT:-results/bf16-gemm/gemm}
mkdir -p "$(dirname "$out")"
cpu=$(lscpu | sed -n 's/^Model name: *//p')
"$py" - "$tmp/runs.jsonl" "$out" "$cpu" <<'PY'
import json, statistics, sys
runs_path, out, cpu = sys.argv[1:]
runs = [json.loads(l) for l in open(runs_path) if l.strip()]
key = lambda r: f"{r['m']}x{r['k']}x{r['n']}:{r['layout']}"
shapes = list(dict.fromkeys(key(r) for r in runs if "m" in r))
rows = []
for s in shapes:
    mn = [r["gflops_median"] for r in runs if r.get("impl") == "mnemo" and "m" in r and key(r) == s]
    pt = [r["gflops_median"] for r in runs if r.get("impl") == "pytorch" and key(r) == s]
    rows.append({"shape": s, "mnemo_gflops": statistics.median(mn), "pytorch_gflops": statistics.median(pt),
                 "ratio": statistics.median(mn) / statistics.median(pt),
                 "mnemo_rounds": mn, "pytorch_rounds": pt})
f32 = [r["gflops_median"] for r in runs if r.get("impl") == "mnemo-f32-peak"]
torch_v = next((r.get("torch") for r in runs if r.get("impl") == "pytorch"), None)
res = {"cpu": cpu, "threads": runs[0].get("threads"), "torch": torch_v, "rounds": max(r["round"] for r in runs),
       "mnemo_f32_peak_1024_gflops": statistics.median(f32), "mnemo_f32_peak_rounds": f32, "shapes": rows}
json.dump(res, open(out + ".json", "w"), indent=1)
print(f"{cpu}, {res['threads']} threads, torch {torch_v}; mnemo f32 1024^3 {res['mnemo_f32_peak_1024_gflops']:.0f} GFLOP/s")
print(f"{'shape':22} {'mnemo':>8} {'torch':>8} {'ratio':>6}")
for r in rows:
    print(f"{r['shape']:22} {r['mnemo_gflops']:8.1f} {r['pytorch_gflops']:8.1f} {r['ratio']:6.2f}")
PY
