#!/usr/bin/env python3
"""Plot results/dsa-long/long-context.json: prefill time and decode time per token vs context,
dense vs sparse, and print the ratios (markdown table)."""
import json, sys, pathlib
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

d = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "results/dsa-long")
rows = json.loads((d / "long-context.json").read_text())["rows"]
ctx = [r["context"] for r in rows]
fig, ax = plt.subplots(1, 2, figsize=(10, 4))
dp = [(r["context"], r["dense_prefill_s"]) for r in rows if r["dense_prefill_s"] is not None]
ax[0].loglog(ctx, [r["sparse_prefill_s"] for r in rows], "o-", label="sparse (DSA top-512)")
ax[0].loglog([c for c, _ in dp], [t for _, t in dp], "s-", label="dense")
ax[0].set_xlabel("context (tokens)"); ax[0].set_ylabel("prefill time (s)"); ax[0].legend()
ax[0].set_title("prefill")
ax[1].loglog(ctx, [r["sparse_decode_ms"] for r in rows], "o-", label="sparse")
ax[1].loglog(ctx, [r["dense_decode_ms"] for r in rows], "s-", label="dense")
ax[1].set_xlabel("context (tokens)"); ax[1].set_ylabel("decode time per token (ms)"); ax[1].legend()
ax[1].set_title("decode")
fig.tight_layout()
fig.savefig(d / "long-context.png", dpi=120)
print("| context | prefill dense / sparse (s) | ratio | decode dense / sparse (ms/token) | ratio |")
print("|---|---|---|---|---|")
for r in rows:
    dps = r["dense_prefill_s"]
    pr = f"{dps:.1f} / {r['sparse_prefill_s']:.1f} | {dps / r['sparse_prefill_s']:.1f}×" if dps else f"— / {r['sparse_prefill_s']:.1f} | —"
    print(f"| {r['context']} | {pr} | {r['dense_decode_ms']:.1f} / {r['sparse_decode_ms']:.1f} | {r['dense_decode_ms'] / r['sparse_decode_ms']:.1f}× |")
m = d / "million.json"
if m.exists():
    r = json.loads(m.read_text())["rows"][0]
    print(f"\n1M: prefill {r['sparse_prefill_s']:.0f} s, decode {r['sparse_decode_ms']:.1f} ms/token sparse, "
          f"{r['dense_decode_ms']:.1f} dense; KV {r['kv_bytes']/2**30:.2f} GiB + indexer keys {r['index_key_bytes']/2**20:.1f} MiB; "
          f"peak RSS {r['peak_rss_bytes']/2**30:.2f} GiB")
