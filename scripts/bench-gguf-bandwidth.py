#!/usr/bin/env python3
"""Memory-bound decoding: mnemo vs llama.cpp's C++ `llama-bench` on a large GGUF (e.g. the
~1.5B random Llama of scripts/make-random-llama-gguf.py at Q4_K_M), and both against the
bandwidth bound measured in the same run (issue #21 item 6).

Per round and thread count (1, then 2), alternating: `mnemo bench membw` (read bandwidth of a
1 GiB buffer, median of 5 passes), `mnemo bench decode`, `llama-bench`. The bound is
bandwidth / weight bytes per token, the weight bytes being every tensor of the file but the
token embedding (one row of it is read per token; all of it when the head is tied to it).
Medians over rounds; writes results/bench-gguf-bandwidth/<model stem>.json.

Usage (hold the build lock for the whole run, so no build runs beside it):
  flock /tmp/mnemo-cargo.lock python3 scripts/bench-gguf-bandwidth.py LLAMA_BIN_DIR MODEL.gguf [ROUNDS=3]
Needs `cargo build --release` and only the Python standard library.
"""
import json
import os
import statistics
import struct
import subprocess
import sys

bindir, model = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
PROMPT, GEN = 64, 32


def gguf_tensor_bytes(path):
    """{name: bytes} of the tensors of a GGUF file (sizes from consecutive data offsets)."""
    f = open(path, "rb")
    rd = lambda fmt: struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]  # noqa
    if f.read(4) != b"GGUF":
        sys.exit(f"{path}: not a GGUF file")
    rd("I")
    nt, nkv = rd("Q"), rd("Q")
    fixed = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
             12: "d"}

    def string():
        return f.read(rd("Q")).decode("utf-8", "replace")

    def value(t):
        if t in fixed:
            return rd(fixed[t])
        if t == 8:
            return string()
        if t == 9:
            it, n = rd("I"), rd("Q")
            return [value(it) for _ in range(n)]
        sys.exit(f"{path}: unknown metadata type {t}")

    align = 32
    for _ in range(nkv):
        k = string()
        v = value(rd("I"))
        if k == "general.alignment":
            align = v
    infos = []
    for _ in range(nt):
        name = string()
        nd = rd("I")
        dims = [rd("Q") for _ in range(nd)]
        rd("I")
        infos.append((rd("Q"), name, dims))
    start = (f.tell() + align - 1) // align * align
    end = os.path.getsize(path) - start
    infos.sort()
    return {name: (infos[i + 1][0] if i + 1 < len(infos) else end) - off
            for i, (off, name, _) in enumerate(infos)}, {n: d for _, n, d in infos}


def run_json(cmd):
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def membw(threads):
    r = run_json(["target/release/mnemo", "--threads", str(threads), "bench", "membw",
                  "--gib", "1", "--reps", "5"])
    return r["median_gb_s"]


def mnemo(threads):
    r = run_json(["target/release/mnemo", "--threads", str(threads), "bench", "decode", model,
                  "--prompt-tokens", str(PROMPT), "--gen", str(GEN)])
    return r["prefill_tok_s"], r["decode_tok_s"]


def llama_bench(threads):
    rs = run_json([os.path.join(bindir, "llama-bench"), "-m", model, "-t", str(threads),
                   "-p", str(PROMPT), "-n", str(GEN), "-r", "1", "-o", "json"])
    pre = next(r for r in rs if r["n_prompt"] == PROMPT and r["n_gen"] == 0)
    dec = next(r for r in rs if r["n_gen"] == GEN and r["n_prompt"] == 0)
    return pre["avg_ts"], dec["avg_ts"]


sizes, dims = gguf_tensor_bytes(model)
emb = sizes["token_embd.weight"]
tied = "output.weight" not in sizes
weight_bytes = sum(sizes.values()) - (0 if tied else emb - emb // dims["token_embd.weight"][1])
cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(
    ["lscpu"], capture_output=True, text=True).stdout.splitlines()
    if ln.startswith("Model name")), "?")
print(f"{model}: {weight_bytes / 1e9:.3f} GB of weights read per token", file=sys.stderr)
runs = []
for r in range(rounds):
    for threads in (1, 2):
        row = {"round": r, "threads": threads, "membw_gb_s": membw(threads)}
        row["mnemo_prefill_tok_s"], row["mnemo_decode_tok_s"] = mnemo(threads)
        row["llamacpp_prefill_tok_s"], row["llamacpp_decode_tok_s"] = llama_bench(threads)
        runs.append(row)
        print(json.dumps(row), file=sys.stderr)
summary = {}
for threads in (1, 2):
    rs = [r for r in runs if r["threads"] == threads]
    med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k not in ("round", "threads")}
    bound = med["membw_gb_s"] * 1e9 / weight_bytes
    med["bound_decode_tok_s"] = bound
    med["mnemo_over_llamacpp_decode"] = med["mnemo_decode_tok_s"] / med["llamacpp_decode_tok_s"]
    med["mnemo_over_llamacpp_prefill"] = (med["mnemo_prefill_tok_s"]
                                          / med["llamacpp_prefill_tok_s"])
    med["mnemo_of_bound"] = med["mnemo_decode_tok_s"] / bound
    med["llamacpp_of_bound"] = med["llamacpp_decode_tok_s"] / bound
    summary[f"threads={threads}"] = med
res = {"model": os.path.basename(model), "cpu": cpu, "weight_bytes_per_token": weight_bytes,
       "prompt_tokens": PROMPT, "gen": GEN, "rounds": rounds,
       "llama_bench": os.path.join(bindir, "llama-bench"), "summary": summary, "runs": runs}
out = "results/bench-gguf-bandwidth/" + os.path.splitext(os.path.basename(model))[0] + ".json"
os.makedirs(os.path.dirname(out), exist_ok=True)
json.dump(res, open(out, "w"), indent=1)
print(json.dumps({"cpu": cpu, "weight_bytes_per_token": weight_bytes, **summary}, indent=1))
