#!/usr/bin/env python3
"""Gate heat-map of a trained Engram model over a code snippet: which tokens use the memory.

Runs `mnemo engram gates RUN --text FILE --json OUT` (one forward pass; per Engram layer and
token, the gate value a = sigmoid(...) of each residual stream, averaged over streams) and draws
(1) the snippet as text, each token's background coloured by its gate value (one panel per
Engram layer) and (2) a layers x tokens heat-map strip.

  python3 scripts/engram-gate-heatmap.py RUN_DIR [SNIPPET] [--out results/engram-gates]
"""
import argparse, json, os, subprocess, sys

p = argparse.ArgumentParser()
p.add_argument("run")
p.add_argument("snippet", nargs="?", default=None)
p.add_argument("--out", default="results/engram-gates")
p.add_argument("--mnemo", default=os.environ.get("MNEMO", "target/release/mnemo"))
p.add_argument("--max-tokens", type=int, default=160)
a = p.parse_args()
os.makedirs(a.out, exist_ok=True)
snippet = a.snippet
if snippet is None:
    snippet = os.path.join(a.out, "snippet.rs")
    with open(snippet, "w") as f:
        f.write('''use std::collections::HashMap;

/// Count the words of a text.
pub fn word_counts(text: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for word in text.split_whitespace() {
        *counts.entry(word.to_lowercase()).or_insert(0) += 1;
    }
    counts
}

fn main() {
    let counts = word_counts("the cat and the hat");
    println!("{:?}", counts.get("the"));
}
''')
js = os.path.join(a.out, "gates.json")
subprocess.run([a.mnemo, "engram", "gates", a.run, "--text", snippet, "--json", js,
                "--max-tokens", str(a.max_tokens)], check=True)
d = json.load(open(js))
toks = d["tokens"]
layers = [(l["layer_id"], [sum(g) / len(g) for g in l["gates"]]) for l in d["layers"]]

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

cmap = plt.get_cmap("viridis")
lines_per_panel = sum(t.count("\n") for t in toks) + 1
fig_h = 0.22 * lines_per_panel * len(layers) + 2.2
fig = plt.figure(figsize=(11, fig_h))
gs = fig.add_gridspec(len(layers) + 1, 1, height_ratios=[lines_per_panel] * len(layers) + [max(3, len(layers) * 2)])
summary = {}
for k, (lid, g) in enumerate(layers):
    ax = fig.add_subplot(gs[k])
    ax.set_xlim(0, 100); ax.set_ylim(-lines_per_panel, 1); ax.axis("off")
    ax.set_title(f"Engram block {lid}: gate value per token (mean over streams)", fontsize=9, loc="left")
    x, y = 0.0, 0.0
    cw = 100 / 110
    for t, v in zip(toks, g):
        parts = t.split("\n")
        for i, part in enumerate(parts):
            if i > 0:
                x, y = 0.0, y - 1
            if part:
                w = cw * len(part.expandtabs(4))
                ax.add_patch(plt.Rectangle((x, y - 0.45), w, 0.9, color=cmap(v), lw=0))
                ax.text(x, y, part.expandtabs(4), fontsize=7, family="monospace", va="center",
                        color="white" if v < 0.5 else "black")
                x += w
    order = np.argsort(g)
    summary[lid] = {"mean": float(np.mean(g)), "top": [[toks[i], g[i]] for i in order[::-1][:12]],
                    "bottom": [[toks[i], g[i]] for i in order[:12]]}
ax = fig.add_subplot(gs[-1])
m = np.array([g for _, g in layers])
im = ax.imshow(m, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
ax.set_yticks(range(len(layers)), [f"block {lid}" for lid, _ in layers])
ax.set_xlabel("token position"); ax.set_title("gate values, layers x tokens", fontsize=9, loc="left")
fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.08, pad=0.35, label="gate a (0 = memory unused, 1 = fully used)")
fig.tight_layout()
png = os.path.join(a.out, "gates.png")
fig.savefig(png, dpi=120)
json.dump({"run": a.run, "snippet": snippet, "layers": summary}, open(os.path.join(a.out, "summary.json"), "w"), indent=1)
for lid, s in summary.items():
    print(f"block {lid}: mean gate {s['mean']:.3f}")
    print("  highest:", ", ".join(f"{t!r} {v:.2f}" for t, v in s["top"]))
    print("  lowest: ", ", ".join(f"{t!r} {v:.2f}" for t, v in s["bottom"]))
print("wrote", png)
