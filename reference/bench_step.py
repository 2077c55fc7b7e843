"""PyTorch training-step benchmark (CPU baseline for mnemo).

Times full training steps of the reference model in float32:
    zero_grad -> forward -> loss -> backward -> clip_grad_norm_(1.0) -> AdamW step
using the fast attention path (F.scaled_dot_product_attention, is_causal=True).

Prints exactly one JSON line on stdout:
  {"impl":"pytorch","torch":...,"threads":N,"batch":B,"seq_len":T,
   "step_ms_median":...,"step_ms_all":[...],"params":count, ...}

Example:
  python reference/bench_step.py --config cfg.json --batch 8 --seq-len 128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import Config, Transformer  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="model config JSON file")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager",
                    help="eager (default) or torch.compile of the model")
    ap.add_argument("--attn", choices=["sdpa", "manual"], default="sdpa",
                    help="attention implementation (sdpa = fast path, default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none",
                    help="bf16: forward and loss under torch.autocast(cpu, bfloat16)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:
        pass  # can only be set once, before any inter-op work

    cfg = Config.load(args.config)
    assert args.seq_len <= cfg.max_seq_len, "seq_len > max_seq_len"
    torch.manual_seed(args.seed)
    model = Transformer(cfg, attn_impl=args.attn).float()
    model.reset_parameters()   # N(0, init_std), norms = 1
    model.train()
    n_params = model.num_params()

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.1, eps=1e-8)
    fwd = torch.compile(model) if args.mode == "compile" else model

    g = torch.Generator().manual_seed(args.seed + 1)
    B, T, V = args.batch, args.seq_len, cfg.vocab_size

    def step():
        # data generation is outside the timed region
        tokens = torch.randint(0, V, (B, T), generator=g)
        targets = torch.randint(0, V, (B, T), generator=g)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
            logits, _ = fwd(tokens)
            loss = F.cross_entropy(logits.view(B * T, V), targets.view(B * T))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        t1 = time.perf_counter()
        return (t1 - t0) * 1e3, loss.item()

    for _ in range(args.warmup):
        step()
    times, losses = [], []
    for _ in range(args.steps):
        ms, l = step()
        times.append(ms)
        losses.append(l)

    out = {
        "impl": "pytorch",
        "torch": torch.__version__,
        "threads": args.threads,
        "batch": B,
        "seq_len": T,
        "step_ms_median": round(statistics.median(times), 3),
        "step_ms_all": [round(t, 3) for t in times],
        "params": n_params,
        "mode": args.mode,
        "attn": args.attn,
        "precision": "bf16" if args.autocast == "bf16" else "f32",
        "tokens_per_s": round(B * T / (statistics.median(times) / 1e3), 1),
        "final_loss": round(losses[-1], 4),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
