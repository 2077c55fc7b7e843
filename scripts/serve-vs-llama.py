"""`mnemo serve` against llama.cpp's `llama-server` on the same GGUF, in one run, alternating.

Both servers run side by side on loopback (2 threads each, the same context per slot/sequence);
they are driven in turns (never at the same time) by the official `openai` async client with
streaming chat requests of exactly `--max-tokens` answer tokens (`ignore_eos`). Per round and
arm, three loads: 1 client x 3 requests, 16 clients x 3 requests, 64 clients x 1 request;
reported: aggregate answer tokens/s (all answer tokens / wall time of the load), request
latency p50/p99, time to first token p50, errors. The arm order alternates between rounds;
the summary takes per-load medians over rounds. Writes summary.json, serve-vs-llama.png.

    /work/serve-venv/bin/python scripts/serve-vs-llama.py --model M.gguf \
        --llama-server /work/llama/build2/bin/llama-server --out results/serve-vs-llama
"""
import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_common import Server, repo_root  # noqa: E402

QUESTIONS = [
    "Write a short poem about the sea.",
    "Explain what a hash map is.",
    "How do I reverse a list in Python?",
    "Tell me about the history of Rome.",
    "List five fruits and their colours.",
    "What is the difference between TCP and UDP?",
    "Describe a sunrise in the mountains.",
    "Why is the sky blue?",
]

LOADS = [(1, 3), (16, 3), (64, 1)]  # (clients, requests per client)


class LlamaServer:
    """`llama-server` on a free port; ready when /health answers 200."""

    def __init__(self, exe, model, threads, slots, ctx_per_slot):
        port = free_port()
        args = [exe, "-m", model, "--host", "127.0.0.1", "--port", str(port),
                "-t", str(threads), "-tb", str(threads), "-np", str(slots),
                "-c", str(ctx_per_slot * slots), "-cb", "--no-webui"]
        self.log = []
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        threading.Thread(target=lambda: [self.log.append(x) for x in self.proc.stderr],
                         daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while time.time() - t0 < 120:
            try:
                if urllib.request.urlopen(self.url + "/health", timeout=2).status == 200:
                    return
            except Exception:  # noqa: BLE001
                time.sleep(0.3)
        self.proc.kill()
        raise RuntimeError("llama-server did not start:\n" + "".join(self.log[-30:]))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


async def one(client, model, question, max_tokens, seed):
    t0 = time.perf_counter()
    ttft, n_chunks, usage = None, 0, None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens, temperature=0.7, seed=seed, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for ch in stream:
        if ch.usage:
            usage = ch.usage.completion_tokens
        for c in ch.choices:
            if c.delta.content:
                n_chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    tokens = usage if usage is not None else n_chunks
    return {"ok": tokens == max_tokens, "latency": time.perf_counter() - t0, "ttft": ttft,
            "tokens": tokens}


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None


async def load(url, model, clients, requests, max_tokens):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                timeout=600)
    results = []

    async def worker(c):
        for r in range(requests):
            q = QUESTIONS[(c + r) % len(QUESTIONS)]
            try:
                results.append(await one(client, model, q, max_tokens, c * 1000 + r))
            except Exception as e:  # noqa: BLE001
                results.append({"ok": False, "error": repr(e)[:300]})

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    await client.close()
    ok = [r for r in results if r["ok"]]
    lat = [r["latency"] for r in ok]
    toks = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall,
            "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "ttft_p50_s": pct([r["ttft"] for r in ok if r["ttft"] is not None], 50),
            "error_samples": [r for r in results if not r["ok"]][:3]}


def model_id(url):
    with urllib.request.urlopen(url + "/v1/models") as r:
        return json.load(r)["data"][0]["id"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnemo", default=os.path.join(repo_root(), "target/release/mnemo"))
    ap.add_argument("--llama-server", default="/work/llama/build2/bin/llama-server")
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slots", type=int, default=16, help="llama-server -np and mnemo --max-batch")
    ap.add_argument("--ctx", type=int, default=2048, help="context per slot / sequence")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mnemo-args", default="", help="extra `mnemo serve` flags")
    ap.add_argument("--out", default=os.path.join(repo_root(), "results/serve-vs-llama"))
    ap.add_argument("--mnemo-only", action="store_true", help="diagnostics: no llama-server arm")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    mn = Server(a.mnemo, a.model, "--max-batch", str(a.slots), "--queue", "256",
                "--ctx", str(a.ctx), *a.mnemo_args.split(), threads=a.threads)
    arms = {"mnemo": (mn.url, model_id(mn.url))}
    ll = None
    if not a.mnemo_only:
        try:
            ll = LlamaServer(a.llama_server, a.model, a.threads, a.slots, a.ctx)
        except Exception:
            mn.stop()
            raise
        arms["llama-server"] = (ll.url, model_id(ll.url))
    rounds = []
    try:
        for name, (url, mid) in arms.items():  # warm-up
            asyncio.run(load(url, mid, 1, 1, 8))
        for r in range(a.rounds):
            order = list(arms) if r % 2 == 0 else list(arms)[::-1]
            for name in order:
                url, mid = arms[name]
                for clients, reqs in LOADS:
                    lv = asyncio.run(load(url, mid, clients, reqs, a.max_tokens))
                    lv.update(round=r, arm=name)
                    print(json.dumps({k: v for k, v in lv.items() if k != "error_samples"}),
                          flush=True)
                    rounds.append(lv)
        stats = json.load(urllib.request.urlopen(mn.url + "/v1/stats"))
    finally:
        mn.stop()
        if ll:
            ll.stop()
    summary = {"model": os.path.basename(a.model), "max_tokens": a.max_tokens,
               "threads": a.threads, "slots": a.slots, "ctx_per_slot": a.ctx,
               "mnemo_args": a.mnemo_args, "rounds": a.rounds, "cpu": cpu_model(),
               "cpus": os.cpu_count(), "openai_version": openai.__version__,
               "python": platform.python_version(), "loads": [], "runs": rounds,
               "mnemo_stats": stats}
    for clients, reqs in LOADS:
        row = {"clients": clients, "requests_per_client": reqs}
        for name in arms:
            rs = [x for x in rounds if x["arm"] == name and x["clients"] == clients]
            row[name] = {k: statistics.median(x[k] for x in rs)
                         for k in ["tokens_per_s", "latency_p50_s", "latency_p99_s",
                                   "ttft_p50_s"]}
            row[name]["errors"] = sum(x["errors"] for x in rs)
        if "llama-server" in arms:
            ll_ = row["llama-server"]
            row["tokens_per_s_ratio"] = row["mnemo"]["tokens_per_s"] / ll_["tokens_per_s"]
            row["p99_ratio"] = row["mnemo"]["latency_p99_s"] / ll_["latency_p99_s"]
        summary["loads"].append(row)
        print(json.dumps(row))
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot(summary, os.path.join(a.out, "serve-vs-llama.png"))
    sys.exit(0 if all(r[n]["errors"] == 0 for r in summary["loads"] for n in arms) else 1)


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor()


def plot(s, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = [r["clients"] for r in s["loads"]]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name, col in [("mnemo", "#2a7"), ("llama-server", "#c54")]:
        if name not in s["loads"][0]:
            continue
        ax[0].plot(xs, [r[name]["tokens_per_s"] for r in s["loads"]], "o-", color=col,
                   label=name)
        ax[1].plot(xs, [r[name]["latency_p50_s"] for r in s["loads"]], "o-", color=col,
                   label=f"{name} p50")
        ax[1].plot(xs, [r[name]["latency_p99_s"] for r in s["loads"]], "s--", color=col,
                   label=f"{name} p99")
    for a_ in ax:
        a_.set_xscale("log", base=2)
        a_.set_xticks(xs, [str(x) for x in xs])
        a_.set_xlabel("concurrent clients")
        a_.legend()
    ax[0].set_ylabel("aggregate answer tokens/s")
    ax[0].set_title("throughput (median of rounds)")
    ax[1].set_ylabel("request latency (s)")
    ax[1].set_title(f"latency, {s['max_tokens']}-token chat answers")
    fig.suptitle(f"{s['model']}, {s['threads']} threads each, {s['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
