"""DeepSeek-V4 with the OFFICIAL inference numerics (`inference/model.py` of DeepSeek-V4-Flash):
transformers 5.23.0's `DeepseekV4ForCausalLM` with the official quantisation round trips
inserted at the official call sites, and its logits for tiny random models.

Writes crates/mnemo/tests/fixtures/deepseek_v4_numerics/<name>/:

  config.json, model.safetensors   the official layout (release names, FP8 e4m3 weights and
                                   FP4 e2m1 experts with E8M0 scales, BF16/F32 where the release
                                   keeps them; v4_official_fixture.py's quantisers); the oracle
                                   ran in float32 on the dequantised values
  expected.safetensors             input_ids I64 [T]
                                   logits        F32 [T, V]  official numerics (below)
                                   logits_exact  F32 [T, V]  transformers unmodified (f32)
                                   moe.sel.<l>, index.sel.<l>: the discrete choices
  meta.json                        versions, seed, margins, the size of the official-numerics
                                   effect, hook counts

The oracle. transformers has no official-numerics path for V4 (5.23.0 and 5.25.0, the newest
release, compute plain f32/bf16; its V4.1 on main has `_fake_quant_fp8_block` /
`_fake_quant_fp4_block`, but for a different architecture and call sites). The official
`kernel.py` is tilelang (GPU only), so its functions are replaced by pure torch as
docs/deepseek-v4.md and the oracle note's table say, the rounding itself done by torch:

  act_quant(x, block, "ue8m0")   amax per block of the last dim, clamped at 1e-4;
                                 s = 2^ceil(log2(amax * (1/448))) (the kernel's bit trick:
                                 exponent field, +1 if any mantissa bit); q = clamp(x/s, ±448)
                                 CAST TO torch.float8_e4m3fn (round to nearest even) and back;
                                 x' = q * s
  fp4_act_quant(x, 32)           amax clamped at 6*2^-126; s = 2^ceil(log2(amax * (1/6)));
                                 q = e2m1(clamp(x/s, ±6)) round to nearest, ties to the even
                                 code (thresholds as transformers V4.1's `_e2m1_codes`); x' = q*s
  rotate_activation(x)           x @ H_n * n^-0.5, H_n the Sylvester Hadamard matrix (what
                                 fast_hadamard_transform.hadamard_transform(x, n^-0.5) computes)

and applied where the official model applies them (read from the official model.py through a
faithful third-party port of its Attention / Compressor / Indexer; the sites):

  1. window K=V: act_quant(kv[..., :-rd], 64, inplace) after kv_norm and RoPE. RoPE touches
     only the last rd channels, so a forward hook on `self_attn.kv_norm` that rounds the
     first head_dim - rd channels is the same thing.
  2. main compressor (CSA and HCA): the same on its entries, hook on `compressor.kv_norm`.
  3. indexer: q after RoPE and the compressed index keys after norm and RoPE each go through
     rotate_activation then fp4_act_quant(., 32): a pre-hook on `indexer.scorer`, whose
     inputs are exactly those two tensors (use_cache=False: keys are scored once).
  4. FP8 / FP4 weight products quantise their input with act_quant(x, 128, ue8m0) (official
     `linear()`): wq_a, wq_b, wkv, wo_b, indexer wq_b, shared experts w1/w3/w2, routed
     experts w1/w3/w2 (FP4 weights, FP8 activations). Not: wo_a (BF16), weights_proj (BF16),
     compressor wkv/wgate (fp32), the gate (fp32), the head (fp32), the mHC fn (fp32).
  5. routed experts multiply their route weight BEFORE w2 (official `Expert.forward`), so
     w2's input is act_quant(weight * swiglu(...)).

Not simulated (mnemo neither): the official model's BF16 activations between these points
(everything else here is float32), its last-position-only logits.

Seeds are searched until every discrete choice (routing top-k, indexer top-k, SwiGLU clamp
edges) has a margin in the official-numerics forward, as v4_fixtures.py does.

Usage (from the repository root):
    /work/v4venv/bin/python reference/v4_official_numerics.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import types

import torch
import torch.nn.functional as F

import transformers
import safetensors
from safetensors.torch import save_file

assert transformers.__version__ == "5.23.0", f"pinned to transformers 5.23.0, found {transformers.__version__}"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import v4_fixtures as VF  # noqa: E402  (randomize, Probe)
import v4_official_fixture as OF  # noqa: E402  (official names, FP8/FP4 weight quantisers)
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as HF  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "crates", "mnemo", "tests", "fixtures", "deepseek_v4_numerics")

FP8_MAX, FP4_MAX = 448.0, 6.0
MIN_GAP = 5e-4
MIN_CLAMP_DIST = 5e-5
SEED_TRIES = 200

# Every dimension the official kernels block: D, q_lora, o_groups*o_lora, moe_inter multiples of
# 128; head_dim - rope 64; index_head_dim a power of 2 and a multiple of 32.
FIXTURES = [
    dict(
        name="official_csa_hca",
        T=144, seed=8001,
        note="CSA(4) + HCA(128), T 144 (> 128: one HCA entry); head_dim 128 (rope 64: one FP8 "
             "block of 64); 8 indexer heads of 64 (two FP4 blocks), index_topk 3 < 36 entries; "
             "hc 2 (4 would double the fixture); FP8/FP4 weights in the official layout",
        config=dict(
            vocab_size=64, hidden_size=128, moe_intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=128, qk_rope_head_dim=64,
            q_lora_rank=128, o_lora_rank=64, o_groups=2,
            n_routed_experts=3, n_shared_experts=1, num_experts_per_tok=2,
            scoring_func="sqrtsoftplus", norm_topk_prob=True,
            routed_scaling_factor=1.5, swiglu_limit=10.0,
            sliding_window=16, compress_ratios=[4, 128], compress_rope_theta=160000.0,
            rope_theta=10000.0,
            rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                          "beta_fast": 32, "beta_slow": 1},
            max_position_embeddings=4096,
            index_n_heads=8, index_head_dim=64, index_topk=3,
            hc_mult=2, hc_sinkhorn_iters=20, hc_eps=1e-6,
            num_hash_layers=1, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=1, hidden_act="silu",
        ),
    ),
]
QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}


# ---------------------------------------------------------------------------------------
# The official kernels' round trips in pure torch (module doc)
# ---------------------------------------------------------------------------------------

def pow2_ceil(t: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(t)) for fp32 t > 0 by the exponent bits (the kernel's fast_round_scale)."""
    bits = t.contiguous().view(torch.int32)
    k = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return torch.exp2(k.to(torch.float32))


def fp8_round_trip(x: torch.Tensor, block: int) -> torch.Tensor:
    n = x.shape[-1]
    assert n % block == 0, f"act_quant: {n} is not a multiple of the block {block}"
    b = x.float().reshape(*x.shape[:-1], n // block, block)
    amax = b.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    s = pow2_ceil(amax * (1.0 / FP8_MAX))
    q = (b / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * s).reshape(x.shape).to(x.dtype)


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def fp4_round_trip(x: torch.Tensor, block: int) -> torch.Tensor:
    n = x.shape[-1]
    assert n % block == 0, f"fp4_act_quant: {n} is not a multiple of the block {block}"
    b = x.float().reshape(*x.shape[:-1], n // block, block)
    amax = b.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0 ** -126)
    s = pow2_ceil(amax * (1.0 / FP4_MAX))
    q = (b / s).clamp(-FP4_MAX, FP4_MAX)
    mag = q.abs()
    # Round to nearest, ties to the even code: a tie goes up where the upper code is even.
    edges = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    up = torch.tensor([False, True, False, True, False, True, False])
    thr = torch.where(up, edges, torch.nextafter(edges, torch.full_like(edges, float("inf"))))
    code = (mag.unsqueeze(-1) >= thr).sum(-1)
    v = E2M1[code] * torch.where(torch.signbit(q), -1.0, 1.0)
    return (v * s).reshape(x.shape).to(x.dtype)


def hadamard(n: int) -> torch.Tensor:
    assert n & (n - 1) == 0, f"Hadamard order {n} is not a power of 2"
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotate_activation(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    return (x.float() @ hadamard(n)) * n ** -0.5


# ---------------------------------------------------------------------------------------
# Installing them on a transformers model (module doc, sites 1-5)
# ---------------------------------------------------------------------------------------

class Official:
    def __init__(self, model, cfg):
        self.handles, self.count = [], {}
        rd = cfg.qk_rope_head_dim

        def tick(k):
            self.count[k] = self.count.get(k, 0) + 1

        def kv_hook(kind):
            def hook(mod, args, out):
                tick(kind)
                out = out.clone()
                out[..., :-rd] = fp8_round_trip(out[..., :-rd], 64)
                return out
            return hook

        def act_pre(kind):
            def hook(mod, args):
                tick(kind)
                return (fp8_round_trip(args[0], 128),) + tuple(args[1:])
            return hook

        def scorer_pre(mod, args):
            tick("indexer q,k: hadamard + fp4")
            q, k, h = args
            return (fp4_round_trip(rotate_activation(q), 32), fp4_round_trip(rotate_activation(k), 32), h)

        def experts_forward(mod, hidden_states, top_k_index, top_k_weights):
            tick("experts")
            final = torch.zeros_like(hidden_states)
            xq = fp8_round_trip(hidden_states, 128)
            for e in range(mod.num_experts):
                pos, tok = torch.where(top_k_index.T == e)  # [k, n] -> slot, token
                if tok.numel() == 0:
                    continue
                g = mod._apply_gate(F.linear(xq[tok], mod.gate_up_proj[e]))
                g = g * top_k_weights[tok, pos, None]          # route weight before w2
                final.index_add_(0, tok, F.linear(fp8_round_trip(g, 128), mod.down_proj[e]))
            return final

        for layer in model.model.layers:
            at = layer.self_attn
            self.handles.append(at.kv_norm.register_forward_hook(kv_hook("window kv: fp8")))
            for lin in (at.q_a_proj, at.q_b_proj, at.kv_proj, at.o_b_proj):
                self.handles.append(lin.register_forward_pre_hook(act_pre("attn act fp8")))
            comp = at.compressor
            if comp is not None:
                self.handles.append(comp.kv_norm.register_forward_hook(kv_hook("entries: fp8")))
            if isinstance(comp, HF.DeepseekV4CSACompressor):
                ix = comp.indexer
                self.handles.append(ix.q_b_proj.register_forward_pre_hook(act_pre("indexer wq_b act fp8")))
                self.handles.append(ix.scorer.register_forward_pre_hook(scorer_pre))
            sh = layer.mlp.shared_experts
            for lin in (sh.gate_proj, sh.up_proj, sh.down_proj):
                self.handles.append(lin.register_forward_pre_hook(act_pre("shared act fp8")))
            layer.mlp.experts.forward = types.MethodType(experts_forward, layer.mlp.experts)
        self.experts = [layer.mlp.experts for layer in model.model.layers]

    def close(self):
        for h in self.handles:
            h.remove()
        for e in self.experts:
            del e.forward


def self_test():
    """The round trips on hand-picked values (ties, scales, clamps)."""
    # FP8: block max 448 -> scale 1; 1 + 1/16 is halfway between 1 and 1.125 -> 1 (even).
    x = torch.tensor([[448.0, 1.0625, 1.1875, -3.0] + [0.0] * 60])
    y = fp8_round_trip(x, 64)
    assert y[0, :4].tolist() == [448.0, 1.0, 1.25, -3.0], y[0, :4]
    # amax 449 -> scale 2 (449/448 > 1): 449 -> 448 (q 224.5 -> 224), 3 -> 4 (1.5 exact)
    y = fp8_round_trip(torch.tensor([[449.0, 3.0] + [0.0] * 62]), 64)
    assert y[0, :2].tolist() == [448.0, 3.0], y[0, :2]
    # FP4: amax 6 -> scale 1; ties 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.3] + [0.0] * 22])
    y = fp4_round_trip(x, 32)
    assert y[0, :10].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, -0.5], y[0, :10]
    # Hadamard: orthonormal
    v = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    assert (rotate_activation(rotate_activation(v)) - v).abs().max() < 1e-5


def quantise(tensors):
    """Official storage (v4_official_fixture.storage_of): FP8 e4m3 128x128 blocks, FP4 e2m1
    experts (32 per scale), E8M0 scales; BF16, F32, I32 as the release. Returns the tensors to
    write and the dequantised f32 value of each."""
    disk, deq = {}, {}
    for name, t in sorted(tensors.items()):
        kind = OF.storage_of(name)
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if kind == "fp8":
            q, e = OF.fp8_quant(t.float())
            disk[name], disk[base + ".scale"] = q, e.view(torch.float8_e8m0fnu)
            deq[name] = OF.fp8_dequant(q, e)
        elif kind == "fp4":
            p, e = OF.fp4_quant(t.float())
            disk[name], disk[base + ".scale"] = p.view(torch.int8), e.view(torch.float8_e8m0fnu)
            deq[name] = OF.fp4_dequant(p, e)
        elif kind == "bf16":
            disk[name] = t.to(torch.bfloat16)
            deq[name] = disk[name].float()
        elif kind == "i32":
            disk[name] = deq[name] = t.to(torch.int32)
        else:
            disk[name] = deq[name] = t.float()
    return disk, deq


def index_margin(scores, index_sel, cfg):
    """The smallest gap between the k-th and (k+1)-th causal indexer scores over the rows that
    select, where an exact tie (FP4 keys and queries make them: rows whose heads' dot products
    are all <= 0 score exactly 0) counts as a margin when the selection took the lower entries
    of the tied set, mnemo's rule (torch leaves the order of ties unspecified). Returns (gap,
    ties at the boundary)."""
    m = cfg.compress_rates["compressed_sparse_attention"]
    gap, ties = float("inf"), 0
    for l, sc in scores.items():
        S, n = sc.shape
        k = min(cfg.index_topk, n)
        for t in range(S):
            valid = (t + 1) // m
            if valid <= k:
                continue
            row = sc[t, :valid]
            srt = row.sort(descending=True).values
            if srt[k - 1] != srt[k]:
                gap = min(gap, (srt[k - 1] - srt[k]).item())
                continue
            ties += 1
            # mnemo's pick: best first, ties to the lower entry
            order = sorted(range(valid), key=lambda w: (-row[w].item(), w))[:k]
            got = sorted(w for w in index_sel[l][t].tolist() if w >= 0)
            if sorted(order) != got:
                gap = 0.0
    return gap, ties


def attempt(spec, seed):
    cfg = DeepseekV4Config(**spec["config"], attn_implementation="eager", experts_implementation="eager")
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(seed)
    VF.randomize(model, cfg, g)
    tensors, src = OF.official_tensors(model, cfg)
    disk, deq = quantise(tensors)
    OF.load_dequantised(model, deq, src)  # the oracle runs on the stored values
    ids = torch.randint(0, cfg.vocab_size, (spec["T"],), generator=g, dtype=torch.int64)
    model.eval()
    with torch.no_grad():
        exact = model(ids[None], use_cache=False).logits[0]
    off = Official(model, cfg)
    probe = VF.Probe(model, cfg)
    scores = {}
    for l, layer in enumerate(model.model.layers):
        if isinstance(layer.self_attn.compressor, HF.DeepseekV4CSACompressor):
            def keep(mod, args, out, l=l):
                scores[l] = out.detach()[0].clone()
            probe.handles.append(layer.self_attn.compressor.indexer.scorer.register_forward_hook(keep))
    with torch.no_grad():
        logits = model(ids[None], use_cache=False).logits[0]
    index_gap, ties = index_margin(scores, probe.index_sel, cfg)
    info = dict(moe_gap=probe.moe_gap, index_gap=index_gap, index_ties_at_boundary=ties,
                clamp_dist=probe.clamp_dist, index_rows_selecting=probe.index_rows_selecting)
    ok = info["moe_gap"] > MIN_GAP and info["index_gap"] > MIN_GAP and info["clamp_dist"] > MIN_CLAMP_DIST
    return ok, cfg, model, ids, logits, exact, probe, off, info, disk


def build(spec, out_root, log):
    name = spec["name"]
    for i in range(SEED_TRIES):
        seed = spec["seed"] + 1000 * i
        ok, cfg, model, ids, logits, exact, probe, off, info, disk = attempt(spec, seed)
        if ok:
            break
        probe.close()
        off.close()
        log(f"  seed {seed}: margins too small {info}")
    else:
        raise RuntimeError(f"{name}: no seed with margins after {SEED_TRIES} tries")
    counts = dict(off.count)
    sel = {f"moe.sel.{l}": s for l, s in probe.moe_sel.items()}
    sel.update({f"index.sel.{l}": s for l, s in probe.index_sel.items()})
    probe.close()
    off.close()
    with torch.no_grad():  # hooks gone: back to transformers' own numbers
        again = model(ids[None], use_cache=False).logits[0]
    assert torch.equal(again, exact), "removing the official hooks did not restore transformers"
    diff = (logits - exact).abs()
    rel = diff.norm(dim=-1) / exact.norm(dim=-1)
    log(f"  seed {seed}: moe gap {info['moe_gap']:.3g}, index gap {info['index_gap']:.3g} "
        f"({info['index_rows_selecting']} rows select, {info['index_ties_at_boundary']} exact ties "
        f"at the boundary resolved to the lower entries), clamp dist {info['clamp_dist']:.3g}")
    log(f"  official vs exact: max |dlogit| {diff.max().item():.3e}, median per-position "
        f"relative error {rel.median().item():.3e} (max {rel.max().item():.3e}); hooks {counts}")

    d = os.path.join(out_root, name)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    save_file({n: t.contiguous() for n, t in sorted(disk.items())}, os.path.join(d, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump({"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
                   **spec["config"], "expert_dtype": "fp4", "torch_dtype": "bfloat16",
                   "quantization_config": QUANT_CONFIG}, fh, indent=1)
        fh.write("\n")
    tensors = {"input_ids": ids.clone(), "logits": logits.contiguous(),
               "logits_exact": exact.contiguous()}
    tensors.update({k: v.contiguous() for k, v in sel.items()})
    save_file(tensors, os.path.join(d, "expected.safetensors"),
              metadata={"generator": f"reference/v4_official_numerics.py; transformers "
                                     f"{transformers.__version__}; torch {torch.__version__}"})
    meta = {
        "name": name, "note": spec["note"], "seed": seed, "T": int(ids.shape[0]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "safetensors": safetensors.__version__, "python": sys.version.split()[0]},
        "numerics": "official inference/model.py round trips on transformers 5.23.0 (module doc); "
                    "float32 elsewhere, on the dequantised FP8/FP4/BF16 weight values",
        "hook_calls": counts,
        "margins": {"moe_topk_gap": info["moe_gap"], "indexer_topk_gap": info["index_gap"],
                    "indexer_rows_that_select": info["index_rows_selecting"],
                    "indexer_exact_ties_at_boundary": info["index_ties_at_boundary"],
                    "swiglu_clamp_min_distance": info["clamp_dist"]},
        "official_vs_exact": {"max_abs_logit_diff": diff.max().item(),
                              "median_rel_err_per_position": rel.median().item(),
                              "max_rel_err_per_position": rel.max().item()},
    }
    with open(os.path.join(d, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
        fh.write("\n")
    sizes = {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))}
    log(f"  wrote {d}: " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    a = ap.parse_args()
    torch.set_num_threads(1)
    self_test()
    for spec in FIXTURES:
        print(spec["name"], flush=True)
        build(spec, a.out, lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
