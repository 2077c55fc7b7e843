#!/usr/bin/env python3
"""Plot the expert load of an MoE run from its metrics.jsonl: per routed layer, the max expert
share relative to the mean (1.0 = perfectly balanced) per batch and over a sliding window of
logged steps (when the metrics carry the raw per-expert loads), plus the validation loss.
Runs that evaluated with per-layer loads (`val_moe`, logged since the validation-load change) also
get the *global* measure: the load over all validation windows routed with the bias of that step
(DeepSeek's MaxVio on held-out text), drawn as markers on the per-batch panel and summarised.
Prints a JSON summary: the first step after which every layer stays under 2x, per measure,
and, after warm-up (the run's lr warm-up, `train.warmup_steps`, unless WARMUP is given), the
worst layer's max share per step and over the window: its maximum, median and the fraction of
steps under 2x. When the run logged every step, the windowed numbers are also given over every
2nd step only (`*_every2`), the grid of runs logged with `log_interval=2`, so that runs logged
either way compare.

LAST_STEP cuts the run there (to compare a partial run with a full one over the same steps).

Usage: scripts/plot-moe-load.py RUN_DIR OUT.png [WINDOW_STEPS=10 [WARMUP [LAST_STEP]]]
(needs matplotlib)
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

run, out = sys.argv[1], sys.argv[2]
window = int(sys.argv[3]) if len(sys.argv) > 3 else 10
run_cfg = json.load(open(f"{run}/run.json"))
warmup = int(sys.argv[4]) if len(sys.argv) > 4 else run_cfg["train"]["warmup_steps"]
last_step = int(sys.argv[5]) if len(sys.argv) > 5 else None
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if l.strip()]
rows = [r for r in rows if last_step is None or r["step"] <= last_step]
moe = [r for r in rows if "moe" in r]
val = [r for r in rows if "val_loss" in r]
layers = sorted({m["layer"] for r in moe for m in r["moe"] if not m["hash"]})
has_raw = all("load" in m for r in moe for m in r["moe"])
steps = [r["step"] for r in moe]


def layer_rows(l):
    return [next(m for m in r["moe"] if m["layer"] == l) for r in moe]


def windowed(l, steps=steps, lr=None):
    """Max share over the logged batches within the last `window` steps."""
    lr = layer_rows(l) if lr is None else lr
    outv = []
    for i, s in enumerate(steps):
        acc = None
        for j in range(i, -1, -1):
            if steps[j] <= s - window:
                break
            ld = lr[j]["load"]
            acc = list(ld) if acc is None else [a + b for a, b in zip(acc, ld)]
        mean = sum(acc) / len(acc)
        outv.append(max(acc) / mean if mean > 0 else 0.0)
    return outv


def settled(series_by_layer):
    """First logged step from which every layer stays < 2x to the end (None if never)."""
    worst = [max(v[i] for v in series_by_layer) for i in range(len(steps))]
    for i in range(len(worst)):
        if all(w < 2.0 for w in worst[i:]):
            return steps[i]
    return None


ncols = 3 if has_raw else 2
fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5))
per_batch = {l: [m["load_max"] for m in layer_rows(l)] for l in layers}
panels = [("per batch", per_batch)]
if has_raw:
    win = {l: windowed(l) for l in layers}
    panels.append((f"over the last {window} steps", win))
for ax, (name, series) in zip(axes, panels):
    for i, l in enumerate(layers):
        c = plt.cm.viridis(i / max(len(layers) - 1, 1))
        ax.plot(steps, series[l], color=c, label=f"layer {l}")
    ax.axhline(2.0, color="red", lw=0.8, ls=":", label="2x mean")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max expert share / mean share")
    ax.set_title(f"max expert load, {name}")
    ax.legend(fontsize=7)
valm = [r for r in rows if "val_moe" in r]
if valm:
    vsteps = [r["step"] for r in valm]
    vlayers = {l: [next(m["load_max"] for m in r["val_moe"] if m["layer"] == l) for r in valm] for l in layers}
    vworst = [max(v[i] for v in vlayers.values()) for i in range(len(vsteps))]
    axes[0].plot(vsteps, vworst, "ks", ms=4, label="validation windows (worst layer)")
    axes[0].legend(fontsize=7)
ax2 = axes[-1]
ax2.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-")
ax2.set_xlabel("step")
ax2.set_ylabel("val loss (nats/token)")
ax2.set_title("validation loss")
fig.tight_layout()
fig.savefig(out, dpi=100)
summary = {"run": run, "settled_under_2x_per_batch": settled(list(per_batch.values()))}
if has_raw:
    summary[f"settled_under_2x_window{window}"] = settled(list(win.values()))
    last = [i for i, s in enumerate(steps) if s > steps[-1] - 100]
    summary["last100_worst_per_batch"] = max(max(per_batch[l][i] for i in last) for l in layers)
    summary[f"last100_worst_window{window}"] = max(max(win[l][i] for i in last) for l in layers)


def after_warmup(series_by_layer, steps=steps):
    """Worst layer per logged step after warm-up: max, median, fraction of steps under 2x."""
    w = sorted(max(v[i] for v in series_by_layer) for i, s in enumerate(steps) if s > warmup)
    if not w:
        return None
    return {
        "max": round(w[-1], 3),
        "median": round(w[len(w) // 2], 3),
        "frac_under_2x": round(sum(x < 2.0 for x in w) / len(w), 3),
        "steps": len(w),
    }


summary["warmup_steps"] = warmup
summary["last_step"] = steps[-1]
summary["after_warmup_per_batch"] = after_warmup(list(per_batch.values()))
if has_raw:
    summary[f"after_warmup_window{window}"] = after_warmup(list(win.values()))
    if all(b - a == 1 for a, b in zip(steps, steps[1:])):
        idx = [i for i, s in enumerate(steps) if s == 1 or s % 2 == 0]
        st2 = [steps[i] for i in idx]
        win2 = [windowed(l, st2, [layer_rows(l)[i] for i in idx]) for l in layers]
        summary[f"after_warmup_window{window}_every2"] = after_warmup(win2, st2)
        pb2 = [[per_batch[l][i] for i in idx] for l in layers]
        summary["after_warmup_per_batch_every2"] = after_warmup(pb2, st2)
if valm:
    summary["val_windows_worst_layer"] = {s: round(w, 3) for s, w in zip(vsteps, vworst)}
    summary["after_warmup_val_windows"] = after_warmup(list(vlayers.values()), vsteps)
    first = next((vsteps[i] for i in range(len(vsteps)) if all(w < 2.0 for w in vworst[i:])), None)
    summary["settled_under_2x_val_windows"] = first
summary["val_loss"] = {r["step"]: round(r["val_loss"], 4) for r in val}
print(json.dumps(summary))
print(f"wrote {out}", file=sys.stderr)
