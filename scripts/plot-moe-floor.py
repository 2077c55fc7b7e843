#!/usr/bin/env python3
"""Plot `scripts/moe-floor.sh` results: the worst routed layer's max expert share over the mean
on held-out text, under the run's bias and under the oracle bias (fitted to 1,024 fresh
training windows by the checkpoint's model), per kept checkpoint; the run's `val_moe` load of
every evaluation (the `eval` windows) from its metrics. Prints a JSON summary: per token set,
the first step from which the run's bias stays under 2x over the kept checkpoints (and, for
`eval`, over every evaluation), and the run and oracle values per kept step.

Usage: scripts/plot-moe-floor.py RUN_DIR OUT.png   (reads RUN_DIR/floor.jsonl and metrics.jsonl)
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

run, out = sys.argv[1], sys.argv[2]
floor = [json.loads(l) for l in open(f"{run}/floor.jsonl") if l.strip()]
floor.sort(key=lambda r: r["step"])
evals = [
    (r["step"], max(m["load_max"] for m in r["val_moe"] if not m["hash"]))
    for r in map(json.loads, filter(str.strip, open(f"{run}/metrics.jsonl")))
    if "val_moe" in r
]


def held_from(points, warmup):
    """First step s >= warmup such that every point from s on is under 2x."""
    pts = [(s, v) for s, v in points if s >= warmup]
    first = None
    for s, v in pts:
        if v >= 2.0:
            first = None
        elif first is None:
            first = s
    return first


warmup = json.load(open(f"{run}/run.json"))["train"]["warmup_steps"]
names = {
    "eval": "the validation windows of each evaluation (evenly spread over the validation split)",
    "val": "1,024 random validation windows x 32 tokens",
    "train": "1,024 random training windows x 32 tokens",
}
summary = {"warmup_steps": warmup, "sets": names}
summary["run_eval_every_evaluation_under_2x_from"] = held_from(evals, warmup)
for k in names:
    pts = [(r["step"], r[f"run_{k}"]) for r in floor]
    summary[f"run_{k}_under_2x_from"] = held_from(pts, warmup)
    summary[f"oracle_{k}_under_2x_from"] = held_from(
        [(r["step"], r[f"oracle_{k}"]) for r in floor], warmup
    )
summary["per_step"] = [
    {"step": r["step"], **{f"{w}_{k}": round(r[f"{w}_{k}"], 3) for w in ("run", "oracle") for k in names}}
    for r in floor
]
print(json.dumps(summary))

fig, ax = plt.subplots(figsize=(9, 4.8))
xs = [r["step"] for r in floor]
ax.plot([s for s, _ in evals], [v for _, v in evals], color="C0", lw=0.8, alpha=0.5,
        label="run bias, eval windows (every evaluation)")
for k, c in (("eval", "C0"), ("val", "C1"), ("train", "C2")):
    ax.plot(xs, [r[f"run_{k}"] for r in floor], "o-", color=c, ms=3, label=f"run bias, {k}")
    ax.plot(xs, [r[f"oracle_{k}"] for r in floor], "x--", color=c, ms=4, label=f"oracle bias, {k}")
ax.axhline(2.0, color="k", lw=0.8, ls=":")
ax.axvline(warmup, color="grey", lw=0.8, ls=":")
ax.set_xscale("log")
ax.set_xlabel("step (log scale; dotted: end of lr warm-up)")
ax.set_ylabel("worst layer: max expert share / mean")
ax.set_title("small-moe on held-out text: the run's bias against an oracle fitted to 32K fresh tokens")
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
fig.savefig(out, dpi=120)
