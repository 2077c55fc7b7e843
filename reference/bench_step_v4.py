"""Training-step benchmark of transformers' DeepseekV4ForCausalLM on CPU (the anchor of mnemo's
DeepSeek-V4 training speed). Pinned: transformers==5.23.0 (reference/requirements-v4.txt).

Times full training steps in float32, eager attention:
    zero_grad -> forward(labels) -> loss -> backward -> clip_grad_norm_(1.0) -> AdamW step
With `--autocast bf16` the forward and the loss run under `torch.autocast("cpu",
dtype=torch.bfloat16)` (PyTorch's mixed precision: bf16 matmuls, float32 weights and optimizer).
on random token ids, for the model of a `config.json` (e.g. written by `mnemo export RUN
--format hf`, so both sides run the same config).

Prints exactly one JSON line on stdout:
  {"impl":"transformers","transformers":...,"torch":...,"threads":N,"batch":B,"seq_len":T,
   "step_ms_median":...,"step_ms_all":[...],"params":count}

Example:
  python reference/bench_step_v4.py --config DIR/config.json --batch 4 --seq-len 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a DeepSeek-V4 config.json")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    ap.add_argument("--experts", default="eager", help="experts_implementation (eager | grouped_mm)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--autocast", choices=["none", "bf16"], default="none",
                    help="bf16: forward and loss under torch.autocast(cpu, bfloat16)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:
        pass
    cfg = DeepseekV4Config(**json.load(open(args.config)))
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.seq_len)
    torch.manual_seed(args.seed)
    model = DeepseekV4ForCausalLM._from_config(
        cfg, dtype=torch.float32, attn_implementation="eager",
        experts_implementation=args.experts,
    )
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)

    def step():
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({
        "impl": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
        "threads": args.threads, "batch": args.batch, "seq_len": args.seq_len,
        "experts_implementation": args.experts,
        "precision": "bf16" if args.autocast == "bf16" else "f32",
        "step_ms_median": statistics.median(times), "step_ms_all": times, "params": params,
    }))


if __name__ == "__main__":
    main()
