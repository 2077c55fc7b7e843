#!/usr/bin/env bash
# Offload throughput: a `tiny-engram` model whose Engram table is scaled to GB (far larger than
# the CPU caches), forward passes with the table in RAM vs memory-mapped from a file (in the page
# cache), alternating RAM/mapped on the same fresh random tokens. The table file is written to
# DIR and deleted at the end (disk: GB; RAM: 2 x GB).
#   GB=2 REPS=12 scripts/engram-offload.sh
# Reported: wall and CPU time per forward, and the Engram lookup (compress, hash, gather) timed
# alone on other fresh tokens just before each forward.
# Results: results/engram-offload/offload-<GB>GB.json, offload.png.
# MNEMO_SMOKE=1: a 0.01 GB table, 2 pairs, into a temp dir (docs/scripts.md).
set -euo pipefail
cd "$(dirname "$0")/.."
MNEMO=${MNEMO:-target/release/mnemo}
GB=${GB:-2}
REPS=${REPS:-12}
DIR=${DIR:-runs/exp/engram-offload}
OUT=${OUT:-results/engram-offload}
smoke=${MNEMO_SMOKE:-0}   # MNEMO_SMOKE=1: seconds-long check, outputs in a temp dir (scripts/smoke-env.sh)
if [ "$smoke" = 1 ]; then
  . scripts/smoke-env.sh
  MNEMO=$smoke_bin; GB=0.01; REPS=2; DIR=$smoke_dir/engram-offload-table; OUT=$smoke_dir/engram-offload
fi
mkdir -p "$OUT" "$DIR"
$MNEMO bench engram-offload --preset tiny-engram --table-gb "$GB" --reps "$REPS" --dir "$DIR" \
  > "$OUT/offload-${GB}GB.json"
rmdir "$DIR" 2>/dev/null || true
${PYTHON:-python3} - "$OUT" <<'PY'
import json, sys, glob, statistics as st
try:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
except ImportError:
    plt = None
    print("matplotlib missing: no offload.png (summary.txt still written)", file=sys.stderr)
out = sys.argv[1]
runs = sorted(glob.glob(f"{out}/offload-*GB.json"))
if plt:
    fig, axes = plt.subplots(2, len(runs), figsize=(5.5 * len(runs), 6.5), squeeze=False)
lines = []
for k, p in enumerate(runs):
    r = json.load(open(p))
    gb = r["table_bytes"] / 1e9
    gr, gm = st.median(r["ram_gather_ms_all"]), st.median(r["mapped_gather_ms_all"])
    line = (f"{gb:.2f} GB table ({r['table_rows']:,} rows of 64 B), {r['batch']}x{r['seq_len']} tokens/forward, "
            f"{r['reps']} pairs: forward RAM {r['ram_tokens_per_s_median']:.0f} tok/s, mapped "
            f"{r['mapped_tokens_per_s_median']:.0f} tok/s (wall {r['mapped_overhead_pct']:+.1f}%, paired median "
            f"{r['mapped_overhead_pct_paired_median']:+.1f}%; CPU {r['mapped_overhead_cpu_pct']:+.1f}%); "
            f"lookup alone: RAM {gr:.1f} ms, mapped {gm:.1f} ms = {r['gather_share_pct'][0]:.2f}% / "
            f"{r['gather_share_pct'][1]:.2f}% of a forward")
    print(line); lines.append(line)
    if not plt:
        continue
    x = range(1, len(r["ram_ms_all"]) + 1)
    ax = axes[0][k]
    ax.plot(x, r["ram_cpu_ms_all"], marker="o", label="table in RAM")
    ax.plot(x, r["mapped_cpu_ms_all"], marker="s", label="table memory-mapped")
    ax.set_ylabel("forward CPU ms"); ax.grid(alpha=.3); ax.legend()
    ax.set_title(f"{gb:.1f} GB Engram table, tiny-engram forward ({r['batch']}x{r['seq_len']})")
    ax = axes[1][k]
    ax.plot(x, r["ram_gather_ms_all"], marker="o", label="lookup, RAM")
    ax.plot(x, r["mapped_gather_ms_all"], marker="s", label="lookup, mapped")
    ax.set_xlabel("repetition (interleaved)"); ax.set_ylabel("lookup wall ms"); ax.grid(alpha=.3); ax.legend()
if plt:
    fig.tight_layout(); fig.savefig(f"{out}/offload.png", dpi=110)
open(f"{out}/summary.txt", "w").write("\n".join(lines) + "\n")
PY
