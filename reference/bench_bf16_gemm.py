"""PyTorch arm of scripts/bench-bf16-gemm.sh: torch.matmul on bf16 tensors (oneDNN on CPU), the
median GFLOP/s of each shape `MxKxN:LAYOUT` (layouts as in crates/mnemo/examples/
bench_bf16_gemm.rs: nn, nt = B read transposed, tn = A read transposed). One JSON line each.

python reference/bench_bf16_gemm.py --threads 2 --iters 10 1024x1024x1024:nn 2048x512x2816:nt
"""
import argparse, json, time
import torch

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--iters", type=int, default=10)
ap.add_argument("shapes", nargs="*", default=["1024x1024x1024:nn"])
args = ap.parse_args()
torch.set_num_threads(args.threads)
for s in args.shapes:
    dims, _, layout = s.partition(":")
    layout = layout or "nn"
    m, k, n = (int(x) for x in dims.split("x"))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(k, m, generator=g).to(torch.bfloat16).t() if layout == "tn" else \
        torch.randn(m, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, k, generator=g).to(torch.bfloat16).t() if layout == "nt" else \
        torch.randn(k, n, generator=g).to(torch.bfloat16)
    c = torch.empty(m, n, dtype=torch.bfloat16)
    torch.matmul(a, b, out=c)
    rates = []
    for _ in range(args.iters):
        t = time.perf_counter()
        torch.matmul(a, b, out=c)
        rates.append(2 * m * n * k / (time.perf_counter() - t) / 1e9)
    rates.sort()
    print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "m": m, "k": k, "n": n,
                      "layout": layout, "threads": torch.get_num_threads(),
                      "gflops_median": round(rates[len(rates) // 2], 2)}), flush=True)
