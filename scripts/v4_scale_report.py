"""Summary, full-model extrapolation and plot of `mnemo v4-scale run` (scripts/v4-scale.sh).

Reads RES/run.json, writes RES/summary.json and RES/v4-scale.png. Everything under
`full_v4_flash` is a model (stated with its assumptions), not a measurement.
"""
import json
import sys

res = sys.argv[1]
run = json.load(open(f"{res}/run.json"))
cfg = run["config"]
L = cfg["layers"]

# V4-Flash: 43 layers; compress_ratios [0, 0, 4, 128, 4, ..., 128, 4] (2 window-only layers,
# 21 CSA, 20 HCA), 256 experts top-6 + 1 shared, vocab 129280, hidden 4096, head_dim 512,
# index_head_dim 128, window 128.
FLASH = {"layers": 43, "csa": 21, "hca": 20, "window_only": 2, "experts": 256, "top_k": 6}
HEAD_BYTES = 129280 * 4096 + 129280 * 32 * 4  # FP8 codes + per-row f32 block scales


def kv_bytes_per_token(n, csa, hca, win, f32=True):
    """mnemo's cache (f32): window rows (<= 128 of 512) per layer, CSA entries (512 + indexer
    128 per 4 tokens), HCA entries (512 per 128 tokens)."""
    b = 4 if f32 else 1
    window = (csa + hca + win) * min(n, 128) * 512 * b
    return (window + csa * (n // 4) * (512 + 128) * b + hca * (n // 128) * 512 * b) / n


# Per layer: the scale model's layers are CSA, HCA, CSA, ... (ceil(L/2) CSA).
csa_s, hca_s = (L + 1) // 2, L // 2
per_layer_bytes = (run["weight_bytes_read_per_token"] - HEAD_BYTES) / L
full_bytes = FLASH["layers"] * per_layer_bytes + HEAD_BYTES

rows = []
for r in run["contexts"]:
    n = r["context"]
    ms = r["decode_ms_per_token"]
    head_ms = ms * r["decode_share_lm_head"]
    layer_ms = (ms - head_ms) / L
    # The full model on this machine: 43 layers at the measured per-layer time (the scale
    # model's mix of CSA/HCA layers), plus the head.
    full_ms = FLASH["layers"] * layer_ms + head_ms
    full_prefill = r["prefill_tok_s"] * L / FLASH["layers"]
    rows.append({
        "context": n,
        "prefill": r["prefill"],
        "decode_ms_per_token": ms,
        "prefill_tok_s": r["prefill_tok_s"],
        "kv_bytes_per_token": r["kv_bytes_per_token"],
        "kv_bytes": r["kv_bytes"],
        "weight_bytes_read_per_token": r["weight_bytes_read_per_token"],
        "rss_bytes": r["rss_bytes"],
        "peak_rss_bytes": r["peak_rss_bytes"],
        "rss_anon_bytes": r["rss_anon_bytes"],
        "rss_file_bytes": r["rss_file_bytes"],
        "decode_share_attention": r["decode_share_attention"],
        "decode_share_lm_head": r["decode_share_lm_head"],
        "full_v4_flash_this_machine": {
            "decode_ms_per_token": full_ms,
            "prefill_tok_s": full_prefill,
            "kv_bytes_per_token_f32": kv_bytes_per_token(n, FLASH["csa"], FLASH["hca"], FLASH["window_only"]),
            "kv_bytes_per_token_fp8": kv_bytes_per_token(n, FLASH["csa"], FLASH["hca"], FLASH["window_only"], f32=False),
        },
    })

# A documented server: 1 x AMD EPYC 9654 (96 cores, 12 channels DDR5-4800: 460.8 GB/s peak).
server = {
    "name": "1x AMD EPYC 9654 (Genoa), 96 cores, 12x DDR5-4800",
    "memory_bandwidth_gb_s": 460.8,
    "cores": 96,
    "assumed_bandwidth_efficiency": 0.6,
}
bw = server["memory_bandwidth_gb_s"] * 1e9 * server["assumed_bandwidth_efficiency"]
server["decode_ms_per_token_bandwidth_bound"] = 1e3 * full_bytes / bw
server["decode_tok_s_bandwidth_bound"] = bw / full_bytes
# Prefill: compute-bound; the measured rate per core of this machine at 4K, times the cores.
r4 = next((r for r in rows if r["context"] >= 4096), rows[0])
cores_here = run["threads"]
server["prefill_tok_s_core_scaled_at_4k"] = (
    r4["full_v4_flash_this_machine"]["prefill_tok_s"] * server["cores"] / cores_here)

summary = {
    "what": "random-weight DeepSeek-V4 with V4-Flash's layer shapes, packed FP8 + FP4 experts, "
            "memory-mapped (mnemo v4-scale run); see REPORT.md",
    "scale_model": {**cfg, "packed_bytes": run["packed_bytes"], "load_s": run["load_s"],
                    "rss_after_load_bytes": run["rss_after_load_bytes"], "threads": run["threads"]},
    "contexts": rows,
    "full_v4_flash": {
        "layers": FLASH,
        "weight_bytes_read_per_token": full_bytes,
        "weight_bytes_per_layer_measured_model": per_layer_bytes,
        "server_model": server,
        "published": {
            "llama.cpp, M3 Max 128 GB (400 GB/s), 2-bit V4-Flash": {"decode_tok_s": 21, "prefill_tok_s": 120},
        },
    },
}
json.dump(summary, open(f"{res}/summary.json", "w"), indent=1)

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

ctx = [r["context"] for r in rows]
fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
ax[0].plot(ctx, [r["decode_ms_per_token"] for r in rows], "o-", label=f"measured ({L} layers, {cfg['experts']} experts)")
ax[0].plot(ctx, [r["full_v4_flash_this_machine"]["decode_ms_per_token"] for r in rows], "s--", label="43 layers (extrapolated)")
ax[0].set_ylabel("decode ms / token"); ax[0].legend()
ax[1].plot(ctx, [r["prefill_tok_s"] for r in rows], "o-", label="measured")
ax[1].plot(ctx, [r["full_v4_flash_this_machine"]["prefill_tok_s"] for r in rows], "s--", label="43 layers (extrapolated)")
ax[1].set_ylabel("prefill tok/s (at this depth)"); ax[1].legend()
ax[2].plot(ctx, [r["kv_bytes_per_token"] for r in rows], "o-", label="measured (f32)")
ax[2].plot(ctx, [r["full_v4_flash_this_machine"]["kv_bytes_per_token_f32"] for r in rows], "s--", label="43 layers (f32, computed)")
ax[2].set_ylabel("KV-cache bytes / token"); ax[2].set_yscale("log"); ax[2].legend()
for a in ax:
    a.set_xscale("log", base=2); a.set_xlabel("context (tokens)"); a.grid(alpha=0.3)
fig.suptitle("DeepSeek-V4, V4-Flash layer shapes, packed FP8/FP4, mmapped experts (mnemo)")
fig.tight_layout()
fig.savefig(f"{res}/v4-scale.png", dpi=110)
print(json.dumps({r["context"]: (round(r["decode_ms_per_token"], 1), round(r["prefill_tok_s"], 2)) for r in rows}))
