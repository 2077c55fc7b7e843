"""Load test of `mnemo serve`: C concurrent streaming clients issue a fixed number of
completion requests each (fixed length: `ignore_eos`), for C = 1 and C = N; reports failed
requests, aggregate tokens/s, latency p50/p99 and time to first token; writes JSON and a plot.

    reference/.venv/bin/python scripts/serve-load.py \
        --model models/SmolLM2-135M-Instruct.Q4_1.gguf --clients 16 --requests 4
"""
import argparse
import http.client
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_common import Server, repo_root  # noqa: E402

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash map is.",
    "def quicksort(xs):",
    "The history of Rome begins",
    "List five fruits and their colours.",
    "fn main() {",
    "Describe a sunrise in the mountains.",
    "What is the difference between TCP and UDP?",
]


def one_request(port, prompt, max_tokens, seed):
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.7,
                       "seed": seed, "stream": True, "ignore_eos": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        return {"ok": False, "status": resp.status, "body": resp.read().decode()[:200]}
    ttft, tokens, done, buf = None, 0, False, b""
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            done = True
            break
        ev = json.loads(data)
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
        elif ev["choices"] and ev["choices"][0]["text"] and ttft is None:
            ttft = time.perf_counter() - t0
    conn.close()
    return {"ok": done and tokens == max_tokens, "latency": time.perf_counter() - t0,
            "ttft": ttft, "tokens": tokens}


def run_level(port, clients, requests, max_tokens):
    results = []
    lock = threading.Lock()

    def worker(c):
        for r in range(requests):
            try:
                res = one_request(port, PROMPTS[(c + r) % len(PROMPTS)], max_tokens, c * 1000 + r)
            except Exception as e:  # noqa: BLE001
                res = {"ok": False, "error": repr(e)}
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    lat = sorted(r["latency"] for r in ok)
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None

    toks = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall,
            "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "errors": [r for r in results if not r["ok"]][:5]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnemo", default=os.path.join(repo_root(), "target/release/mnemo"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(repo_root(), "results/serve/load.json"))
    a = ap.parse_args()
    levels = []
    with Server(a.mnemo, a.model, "--max-batch", str(a.clients), "--queue", "256") as srv:
        # Warm-up.
        one_request(srv.port, "hello", 4, 0)
        for c in sorted({1, a.clients}):
            lv = run_level(srv.port, c, a.requests, a.max_tokens)
            print(json.dumps({k: v for k, v in lv.items() if k != "errors"}))
            levels.append(lv)
        stats = json.loads(__import__("urllib.request").request.urlopen(srv.url + "/v1/stats").read())
    out = {"model": os.path.basename(a.model), "max_tokens": a.max_tokens,
           "requests_per_client": a.requests, "cpus": os.cpu_count(),
           "loadavg_at_end": os.getloadavg(), "levels": levels, "server_stats": stats,
           "speedup_tokens_per_s": levels[-1]["tokens_per_s"] / levels[0]["tokens_per_s"]}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    print("speed-up (aggregate tokens/s, %d clients vs 1): %.2fx" % (a.clients, out["speedup_tokens_per_s"]))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        xs = [str(lv["clients"]) for lv in levels]
        ax[0].bar(xs, [lv["tokens_per_s"] for lv in levels], color=["#888", "#2a7"])
        ax[0].set_xlabel("concurrent streaming clients")
        ax[0].set_ylabel("aggregate tokens/s")
        ax[0].set_title("throughput")
        w = 0.35
        for i, (k, lab) in enumerate([("latency_p50_s", "p50"), ("latency_p99_s", "p99")]):
            ax[1].bar([j + i * w for j in range(len(xs))], [lv[k] for lv in levels], w, label=lab)
        ax[1].set_xticks([j + w / 2 for j in range(len(xs))], xs)
        ax[1].set_xlabel("concurrent streaming clients")
        ax[1].set_ylabel("request latency (s)")
        ax[1].set_title(f"latency ({a.max_tokens} tokens/request)")
        ax[1].legend()
        fig.suptitle(f"mnemo serve, {out['model']}, {os.cpu_count()} CPUs")
        fig.tight_layout()
        fig.savefig(a.out.replace(".json", ".png"), dpi=110)
    except ImportError:
        pass
    sys.exit(0 if all(lv["failed"] == 0 for lv in levels) else 1)


if __name__ == "__main__":
    main()
