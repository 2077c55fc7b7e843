"""Lookup-first decoding on a code-editing task (the prompt holds a source file, the answer
rewrites it): greedy tokens/s with and without lookup, identical output, and the lossy
`--threshold` mode's speed and agreement with greedy. Writes JSON and a plot.

    reference/.venv/bin/python scripts/lookup-bench.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_common import repo_root  # noqa: E402


def bench(a, *extra):
    cmd = [a.mnemo, "bench", "lookup", a.model, "--prompt-file", a.prompt_file, "--chat",
           "--max-tokens", str(a.max_tokens), "--reps", str(a.reps), *extra]
    print("$ " + " ".join(cmd), flush=True)
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnemo", default=os.path.join(repo_root(), "target/release/mnemo"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-file", default=os.path.join(repo_root(), "scripts/data/edit-task.txt"))
    ap.add_argument("--max-tokens", type=int, default=300)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(repo_root(), "results/serve/lookup.json"))
    a = ap.parse_args()
    exact = bench(a, "--threshold", "0.9", "--threshold", "0.6")
    fast = bench(a, "--fast-verify")
    out = {"task": os.path.relpath(a.prompt_file, repo_root()), "exact_verify": exact,
           "fast_verify": fast, "loadavg_at_end": os.getloadavg()}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    rows = [("plain greedy", exact["plain"]["tok_s"], True),
            ("lookup\n(fast verify)", fast["lookup"]["tok_s"], fast["lookup"]["identical_to_plain"]),
            ("lookup\n(exact verify)", exact["lookup"]["tok_s"], exact["lookup"]["identical_to_plain"])]
    for l in exact["lossy"]:
        rows.append((f"lossy\nP={l['threshold']:.1f}", l["tok_s"], l["identical"]))
    for name, tps, same in rows:
        print(f"{name.replace(chr(10), ' '):28s} {tps:7.1f} tok/s  identical to greedy: {same}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 3.8))
        bars = ax.bar([r[0] for r in rows], [r[1] for r in rows],
                      color=["#888"] + ["#2a7" if r[2] else "#d55" for r in rows[1:]])
        for b, r in zip(bars, rows):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(),
                    "same" if r[2] else "differs", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("decode tokens/s (greedy)")
        ax.set_title(f"lookup-first decoding, code edit, {os.path.basename(a.model)}")
        fig.tight_layout()
        fig.savefig(a.out.replace(".json", ".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
