#!/usr/bin/env python3
"""Plot the expert load of an MoE run from its metrics.jsonl: per routed layer, the max and
min expert share relative to the mean (1.0 = perfectly balanced), plus the validation loss.

Usage: scripts/plot-moe-load.py RUN_DIR OUT.png   (needs matplotlib, e.g. the reference venv)
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

run, out = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if l.strip()]
moe = [r for r in rows if "moe" in r]
val = [r for r in rows if "val_loss" in r]
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
layers = sorted({m["layer"] for r in moe for m in r["moe"] if not m["hash"]})
for i, l in enumerate(layers):
    steps = [r["step"] for r in moe]
    mx = [next(m["load_max"] for m in r["moe"] if m["layer"] == l) for r in moe]
    mn = [next(m["load_min"] for m in r["moe"] if m["layer"] == l) for r in moe]
    c = plt.cm.viridis(i / max(len(layers) - 1, 1))
    ax.plot(steps, mx, color=c, label=f"layer {l} max")
    ax.plot(steps, mn, color=c, ls="--", alpha=0.6, label=f"layer {l} min")
ax.axhline(2.0, color="red", lw=0.8, ls=":", label="2x mean")
ax.axhline(1.0, color="gray", lw=0.8)
ax.set_xlabel("step")
ax.set_ylabel("expert share / mean share")
ax.set_title("expert load per step (bias balancing only)")
ax.legend(fontsize=7, ncol=2)
ax2.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-")
ax2.set_xlabel("step")
ax2.set_ylabel("val loss (nats/token)")
ax2.set_title("validation loss")
fig.tight_layout()
fig.savefig(out, dpi=100)
print(f"wrote {out}")
