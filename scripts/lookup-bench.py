"""Lookup-first decoding on a code-editing task (the prompt holds a source file, the answer
rewrites it): greedy tokens/s of plain decoding, lookup with adaptive drafting, lookup with a
fixed draft length and the lossy `--threshold` mode, all interleaved in one process (median of
`--reps` repetitions and the per-repetition ratio to plain), identical output checked. Also the
cost of a k-row verification forward relative to one row (`mnemo bench rows`, one worker
thread, CPU time, per component). Writes JSON and plots.

    python3 scripts/lookup-bench.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_common import repo_root  # noqa: E402


def run_json(cmd, env=None):
    print("$ " + " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnemo", default=os.path.join(repo_root(), "target/release/mnemo"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-file", default=os.path.join(repo_root(), "scripts/data/edit-task.txt"))
    ap.add_argument("--max-tokens", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows-reps", type=int, default=5)
    ap.add_argument("--skip-rows", action="store_true")
    ap.add_argument("--out", default=os.path.join(repo_root(), "results/serve/lookup.json"))
    a = ap.parse_args()
    rows_out = a.out.replace(".json", "-rows.json")
    if not a.skip_rows:
        rows = run_json([a.mnemo, "bench", "rows", a.model, "--rows", "1,2,3,4,5,6,7,8",
                         "--reps", str(a.rows_reps)], env={"RAYON_NUM_THREADS": "1"})
        with open(rows_out, "w") as f:
            json.dump(rows, f, indent=2)
    b = run_json([a.mnemo, "bench", "lookup", a.model, "--prompt-file", a.prompt_file, "--chat",
                  "--max-tokens", str(a.max_tokens), "--reps", str(a.reps), "--fixed-draft",
                  "--threshold", "0.9", "--threshold", "0.6"])
    b["task"] = os.path.relpath(a.prompt_file, repo_root())
    with open(a.out, "w") as f:
        json.dump(b, f, indent=2)
    rows = [("plain greedy", b["plain"]), ("lookup\n(adaptive)", b["lookup"]),
            ("lookup\n(fixed 8)", b["lookup_fixed_draft"])]
    for l in b["lossy"]:
        rows.append((f"lossy\nP={l['threshold']:.1f}", l))
    print(f"load average {b['loadavg_start']} -> {b['loadavg_end']}")
    for name, t in rows:
        print(f"{name.replace(chr(10), ' '):22s} {t['tok_s']:7.1f} tok/s (median of {b['reps']}), "
              f"x{t['speedup_vs_plain_median']:.2f} vs plain per rep {t['speedup_vs_plain_per_rep']}, "
              f"CPU x{t['cpu_speedup_vs_plain']:.2f}, identical: {t['identical_to_plain']}, "
              f"{t['tokens_per_pass']:.2f} tok/pass, {t['rows_per_pass']:.2f} rows/pass")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 3.8))
        bars = ax.bar([r[0] for r in rows], [r[1]["tok_s"] for r in rows],
                      color=["#888"] + ["#2a7" if r[1]["identical_to_plain"] else "#d55" for r in rows[1:]])
        for bar, r in zip(bars, rows):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(),
                    ("same" if r[1]["identical_to_plain"] else "differs")
                    + f"\nx{r[1]['speedup_vs_plain_median']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("decode tokens/s (greedy, median)")
        ax.set_title(f"lookup-first decoding, code edit, {os.path.basename(a.model)}")
        ax.set_ylim(0, max(r[1]["tok_s"] for r in rows) * 1.25)
        fig.tight_layout()
        fig.savefig(a.out.replace(".json", ".png"), dpi=110)
        if os.path.exists(rows_out):
            rj = json.load(open(rows_out))
            fig, ax = plt.subplots(figsize=(6.5, 4))
            ks = [r["rows"] for r in rj["rows"]]
            ax.plot(ks, [r["cpu_vs_1_row"] for r in rj["rows"]], "o-", label="whole forward")
            for comp in ["qkv", "ffn_up", "ffn_down", "lm_head", "attention"]:
                ax.plot(ks, [r["component_cpu_vs_1_row"][comp] for r in rj["rows"]], ".--", label=comp)
            before = os.path.join(os.path.dirname(a.out), "lookup-rows-before.json")
            if os.path.exists(before):
                bj = json.load(open(before))
                ax.plot([r["rows"] for r in bj["rows"]], [r["cpu_vs_1_row"] for r in bj["rows"]],
                        "s:", color="#999", label="whole forward, before")
            ax.plot(ks, ks, color="#ccc", lw=0.8, label="k × one row")
            ax.set_xlabel("rows in one forward (k)")
            ax.set_ylabel("CPU time / one row's")
            ax.set_title("cost of a k-row verification forward (1 thread)")
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(rows_out.replace(".json", ".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
