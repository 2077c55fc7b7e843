#!/usr/bin/env python3
"""Prefill and decode speed: mnemo vs llama.cpp (llama-cpp-python) on the same GGUF, same
thread count, alternating runs. Writes results/bench-llamacpp/<model file stem>.json and .png.

Usage: reference/.venv/bin/python scripts/bench-llamacpp.py models/SmolLM2-135M-Instruct.Q4_1.gguf [ROUNDS=5]
Needs llama-cpp-python built for this CPU (see reference/llamacpp_fixture.py) and
`cargo build --release`.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import llama_cpp
import numpy as np

model, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
PROMPT, GEN = 128, 32
text = "fn add(a: u32, b: u32) -> u32 {\n    a + b\n}\n" * PROMPT


def llamacpp(threads):
    llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    toks = llm.tokenize(text.encode(), add_bos=False)[:PROMPT]
    t0 = time.perf_counter()
    llm.eval(toks)
    prefill = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(GEN):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([t])
    decode = time.perf_counter() - t1
    return {"impl": "llama.cpp", "threads": threads, "prefill_tok_s": len(toks) / prefill, "decode_tok_s": GEN / decode}


def mnemo(threads):
    out = subprocess.run(["target/release/mnemo", "--threads", str(threads), "bench", "decode", model,
                          "--prompt-tokens", str(PROMPT), "--gen", str(GEN)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


runs = []
for threads in (1, 2):
    for r in range(rounds):
        for f in (mnemo, llamacpp):
            res = f(threads)
            runs.append(res)
            print(json.dumps(res), file=sys.stderr)
summary = {}
for threads in (1, 2):
    for impl in ("mnemo", "llama.cpp"):
        rs = [r for r in runs if r["impl"] == impl and r["threads"] == threads]
        summary[f"{impl}@{threads}"] = {k: statistics.median(r[k] for r in rs) for k in ("prefill_tok_s", "decode_tok_s")}
for threads in (1, 2):
    m, l = summary[f"mnemo@{threads}"], summary[f"llama.cpp@{threads}"]
    summary[f"ratio@{threads}"] = {"decode_mnemo_over_llamacpp": m["decode_tok_s"] / l["decode_tok_s"],
                                   "prefill_mnemo_over_llamacpp": m["prefill_tok_s"] / l["prefill_tok_s"]}
res = {"model": model.split("/")[-1], "prompt_tokens": PROMPT, "gen": GEN, "rounds": rounds,
       "llama_cpp_python": llama_cpp.__version__, "summary": summary, "runs": runs}
out = "results/bench-llamacpp/" + os.path.splitext(os.path.basename(model))[0]
os.makedirs(os.path.dirname(out), exist_ok=True)
json.dump(res, open(out + ".json", "w"), indent=1)
print(json.dumps(summary, indent=1))
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("decode_tok_s", "prefill_tok_s"), ("decode", f"prefill ({PROMPT} tokens)")):
        xs = np.arange(2)
        for k, (impl, c) in enumerate((("mnemo", "#2a7"), ("llama.cpp", "#c63"))):
            vals = [summary[f"{impl}@{t}"][key] for t in (1, 2)]
            ax.bar(xs + 0.38 * k, vals, 0.38, label=impl, color=c)
            for x, v in zip(xs + 0.38 * k, vals):
                ax.text(x, v, f"{v:.0f}", ha="center", va="bottom")
        ax.set_xticks(xs + 0.19, ["1 thread", "2 threads"])
        ax.set_ylabel("tokens/s (median)")
        ax.set_title(f"SmolLM2-135M Q4_1: {title}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=100)
except ImportError:
    pass
