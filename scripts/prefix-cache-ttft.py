"""Prompt (prefix) cache: time to first token of a question over a long packed-repository
context, cold (full prefill) vs cached in memory vs reloaded from disk by a restarted server.

SmolLM2's GGUF declares a 4096-token context (mnemo's max_seq_len for it), so the >= 32K-token
measurement uses a tiny random model (trained 2 steps, d=64, 2 layers, max_seq_len 40000): the
timings show the prefill work that the cache removes, not answer quality. A second measurement
uses SmolLM2 at ~3.5K tokens.

    reference/.venv/bin/python scripts/prefix-cache-ttft.py
"""
import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_common import Server, repo_root  # noqa: E402


def ttft(port, prompt, max_tokens=8):
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    first, usage, text = None, None, ""
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if ev.get("usage"):
            usage = ev["usage"]
        elif ev["choices"]:
            if first is None:
                first = time.perf_counter() - t0
            text += ev["choices"][0]["text"]
    return {"ttft_s": first, "total_s": time.perf_counter() - t0,
            "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"], "text": text}


def measure(mnemo, model, context, questions, extra, cache_dir):
    shutil.rmtree(cache_dir, ignore_errors=True)
    runs = []
    with Server(mnemo, model, "--prefix-cache-dir", cache_dir, "--prefix-min-tokens", "1024",
                *extra) as srv:
        for name, q in [("cold", questions[0]), ("cached (memory)", questions[1])]:
            r = ttft(srv.port, context + q)
            r["case"] = name
            print(json.dumps({k: v for k, v in r.items() if k != "text"}), flush=True)
            runs.append(r)
    with Server(mnemo, model, "--prefix-cache-dir", cache_dir, "--prefix-min-tokens", "1024",
                *extra) as srv:
        r = ttft(srv.port, context + questions[2])
        r["case"] = "cached (disk, restarted server)"
        print(json.dumps({k: v for k, v in r.items() if k != "text"}), flush=True)
        runs.append(r)
    return runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnemo", default=os.path.join(repo_root(), "target/release/mnemo"))
    ap.add_argument("--smollm2", default=os.path.join(repo_root(), "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--tokens", type=int, default=33000, help="context size for the tiny model")
    ap.add_argument("--out", default=os.path.join(repo_root(), "results/serve/prefix-cache.json"))
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="mnemo-prefix-")
    root = repo_root()
    # A tiny model with a 40K context, its tokenizer trained on this repository's sources.
    run = os.path.join(tmp, "run")
    subprocess.run([a.mnemo, "train", "--data", os.path.join(root, "crates"), "--out", run,
                    "--steps", "2", "--quiet", "--seq-len", "64", "--batch-size", "2",
                    "--set", "max_seq_len=40000", "--set", "vocab_size=512", "--set", "d_model=64",
                    "--set", "n_layers=2", "--set", "n_heads=4", "--set", "n_kv_heads=2",
                    "--set", "head_dim=16", "--set", "rope_dim=16", "--set", "ffn_hidden=128"],
                   check=True, env={**os.environ, "MNEMO_CACHE": os.path.join(tmp, "cache")})
    packed = subprocess.run([a.mnemo, "pack", os.path.join(root, "crates"), "--tokenizer", run,
                             "--max-tokens", str(a.tokens)], check=True, capture_output=True,
                            text=True).stdout
    qs = ["\n\nQuestion: where is the KV cache saved?\nAnswer:",
          "\n\nQuestion: how are requests batched?\nAnswer:",
          "\n\nQuestion: what does the tokenizer do?\nAnswer:"]
    out = {"tiny_model": {"note": "random tiny model (d=64, 2 layers, max_seq_len 40000); timings only",
                          "runs": measure(a.mnemo, run, packed, qs, ["--ctx", "40000"],
                                          os.path.join(tmp, "pc1"))}}
    if os.path.exists(a.smollm2):
        ctx = packed[:11000]
        out["smollm2"] = {"note": "SmolLM2-135M-Instruct Q4_1, context 4096",
                          "runs": measure(a.mnemo, a.smollm2, ctx, qs, [], os.path.join(tmp, "pc2"))}
    out["loadavg_at_end"] = os.getloadavg()
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        keys = [k for k in ("tiny_model", "smollm2") if k in out]
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
        axes = axes if len(keys) > 1 else [axes]
        for ax, k in zip(axes, keys):
            runs = out[k]["runs"]
            ax.bar([r["case"].replace(" (", "\n(") for r in runs], [r["ttft_s"] for r in runs],
                   color=["#d55", "#2a7", "#27a"])
            ax.set_yscale("log")
            ax.set_ylabel("time to first token (s, log)")
            ax.set_title(f"{k}: {runs[0]['prompt_tokens']} prompt tokens")
            for i, r in enumerate(runs):
                ax.text(i, r["ttft_s"], f"{r['ttft_s']:.2f}s", ha="center", va="bottom", fontsize=8)
        fig.tight_layout()
        fig.savefig(a.out.replace(".json", ".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
