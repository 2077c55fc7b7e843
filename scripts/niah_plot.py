"""Heat-maps (depth x context) of the NIAH accuracy JSONs written by `mnemo eval --task niah`."""
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "results/niah")
label = f", {sys.argv[2]}" if len(sys.argv) > 2 else ""
runs = [
    ("base_plain_extrapolation.json", "trained at 256,\nplain RoPE extrapolation"),
    ("base_zero_shot_yarn.json", "trained at 256,\nzero-shot YaRN x4"),
    ("yarn4_continued.json", "+ YaRN x4 continuation\n(1024 tokens)"),
]
runs = [(f, t) for f, t in runs if (root / f).exists()]
fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), squeeze=False)
for ax, (f, title) in zip(axes[0], runs):
    d = json.loads((root / f).read_text())
    ctx = sorted({c["context"] for c in d["cells"]})
    dep = sorted({c["depth"] for c in d["cells"]})
    grid = [[next(c["accuracy"] for c in d["cells"] if c["context"] == x and c["depth"] == y)
             for x in ctx] for y in dep]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
    ax.set_xticks(range(len(ctx)), [str(c) for c in ctx])
    ax.set_yticks(range(len(dep)), [f"{y:.2f}" for y in dep])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center",
                    color="white" if v < 0.6 else "black", fontsize=8)
fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
fig.suptitle("NIAH accuracy, tiny model (4.3M params)%s, %d samples per cell" % (label, d["samples"]),
             fontsize=10, y=1.06)
out = root / "niah_heatmap.png"
fig.savefig(out, dpi=120, bbox_inches="tight")
print("wrote", out)

# Partial credit: share of answers whose digits 2-5 are right (the copy without the first digit),
# per file and context, printed and written to partial.csv.
rows = []
for f, title in runs:
    d = json.loads((root / f).read_text())
    for ctx in sorted({c["context"] for c in d["cells"]}):
        ans = [a for c in d["cells"] if c["context"] == ctx for a in c["answers"]]
        exact = sum(c["correct"] for c in d["cells"] if c["context"] == ctx) / len(ans)
        tail4 = sum(g[2:6] == e[2:6] for e, g in ans) / len(ans)
        rows.append((f.removesuffix(".json"), ctx, len(ans), exact, tail4))
with open(root / "partial.csv", "w") as out_csv:
    out_csv.write("run,context,samples,exact,digits_2_to_5\n")
    for r in rows:
        out_csv.write("%s,%d,%d,%.3f,%.3f\n" % r)
        print("%-28s ctx %5d  n=%3d  exact %5.1f%%  digits 2-5 %5.1f%%" % (r[0], r[1], r[2], 100 * r[3], 100 * r[4]))
