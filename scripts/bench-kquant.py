#!/usr/bin/env python3
"""Prefill and decode speed on a k-quant GGUF: mnemo (`mnemo bench decode`) vs llama.cpp's own
C++ `llama-bench` (no Python loop), same file, 1 and 2 threads, alternating rounds, medians.
Writes results/bench-kquant/<model file stem>.json and REPORT rows on stdout.

Usage (hold the build lock for the whole run, so no build runs beside it):
  flock /tmp/mnemo-cargo.lock python3 scripts/bench-kquant.py LLAMA_BIN_DIR MODEL.gguf [ROUNDS=3]
e.g. LLAMA_BIN_DIR=/work/llama/build2/bin (llama.cpp of the llama-cpp-python 0.3.36 sdist,
GGML_NATIVE=OFF, AVX2/AVX-512 flags, AVX-VNNI off). Needs `cargo build --release`.
Prompt 128 tokens, 32 generated tokens, as scripts/bench-llamacpp.py.
"""
import json
import os
import statistics
import subprocess
import sys

bindir, model = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
PROMPT, GEN = 128, 32


def llama_bench(threads):
    out = subprocess.run([os.path.join(bindir, "llama-bench"), "-m", model, "-t", str(threads),
                          "-p", str(PROMPT), "-n", str(GEN), "-r", "1", "-o", "json"],
                         capture_output=True, text=True, check=True)
    rs = json.loads(out.stdout)
    pre = next(r for r in rs if r["n_prompt"] == PROMPT and r["n_gen"] == 0)
    dec = next(r for r in rs if r["n_gen"] == GEN and r["n_prompt"] == 0)
    return {"impl": "llama.cpp", "threads": threads, "prefill_tok_s": pre["avg_ts"],
            "decode_tok_s": dec["avg_ts"]}


def mnemo(threads):
    out = subprocess.run(["target/release/mnemo", "--threads", str(threads), "bench", "decode",
                          model, "--prompt-tokens", str(PROMPT), "--gen", str(GEN)],
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    return {"impl": "mnemo", "threads": threads, "prefill_tok_s": r["prefill_tok_s"],
            "decode_tok_s": r["decode_tok_s"]}


cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(
    ["lscpu"], capture_output=True, text=True).stdout.splitlines()
    if ln.startswith("Model name")), "?")
runs = []
for r in range(rounds):
    for threads in (1, 2):
        for f in (mnemo, llama_bench):
            res = f(threads)
            runs.append(res)
            print(json.dumps(res), file=sys.stderr)
summary = {}
for threads in (1, 2):
    for impl in ("mnemo", "llama.cpp"):
        rs = [r for r in runs if r["impl"] == impl and r["threads"] == threads]
        summary[f"{impl}@{threads}"] = {k: statistics.median(r[k] for r in rs)
                                        for k in ("prefill_tok_s", "decode_tok_s")}
    m, lc = summary[f"mnemo@{threads}"], summary[f"llama.cpp@{threads}"]
    summary[f"ratio@{threads}"] = {
        "decode_mnemo_over_llamacpp": m["decode_tok_s"] / lc["decode_tok_s"],
        "prefill_mnemo_over_llamacpp": m["prefill_tok_s"] / lc["prefill_tok_s"]}
res = {"model": os.path.basename(model), "cpu": cpu, "prompt_tokens": PROMPT, "gen": GEN,
       "rounds": rounds, "llama_bench": os.path.join(bindir, "llama-bench"),
       "summary": summary, "runs": runs}
out = "results/bench-kquant/" + os.path.splitext(os.path.basename(model))[0] + ".json"
os.makedirs(os.path.dirname(out), exist_ok=True)
json.dump(res, open(out, "w"), indent=1)
print(json.dumps({"cpu": cpu, **summary}, indent=1))
