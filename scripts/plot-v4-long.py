"""Plot results/v4-long/{v4-small,small-dsa}.json: KV bytes per token and decode ms per token."""
import json
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

runs = {p: json.load(open(f"results/v4-long/{p}.json"))["rows"] for p in ["v4-small", "small-dsa"]}
fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
for p, rows in runs.items():
    ctx = [r["context"] for r in rows]
    ax[0].loglog(ctx, [(r["kv_bytes"] + r["index_key_bytes"]) / r["context"] for r in rows], "o-", label=p)
    ax[1].semilogx(ctx, [r["sparse_decode_ms"] for r in rows], "o-", label=p)
ax[0].set_xlabel("context (tokens)"); ax[0].set_ylabel("cache bytes per token (KV + indexer keys)")
ax[1].set_xlabel("context (tokens)"); ax[1].set_ylabel("decode ms per token")
for a in ax:
    a.legend(); a.grid(alpha=0.3)
fig.tight_layout()
fig.savefig("results/v4-long/long-context.png", dpi=120)
print("| context | model | cache bytes/token | decode ms/token |")
print("|---|---|---|---|")
for p, rows in runs.items():
    for r in rows:
        print(f"| {r['context']} | {p} | {(r['kv_bytes'] + r['index_key_bytes']) / r['context']:.0f} | {r['sparse_decode_ms']:.1f} |")
