"""Generate numerical fixtures for mnemo's Rust tests.

For each config below, writes crates/mnemo/tests/fixtures/<name>.safetensors with

  metadata: {"config": <config JSON>, "batch": str(B), "seq_len": str(T)}
  tensors:  "tokens" int64 [B,T], "targets" int64 [B,T],
            every parameter by name (float32),
            "logits" float32 [B,T,V], "loss" float32 [1],
            "grad.<param name>" float32 for every parameter (d loss / d param).
  MoE fixtures also store the buffers "layers.{l}.ffn.gate.bias" (float32, no
  gradient) and, on hash layers, "layers.{l}.ffn.tid2eid" (int32 [V, k]), plus
  "moe.sel.{l}" (int64 [B*T, k], each MoE layer's chosen experts, ascending per row).

Parameters and tokens are drawn with a seeded torch.Generator; parameters are
drawn in float32 (these exact float32 values are stored), then the model is cast
to float64 and forward + backward run in float64; results are stored as float32.

Before writing, the script self-checks (in float64):
  * manual causal GQA attention == F.scaled_dot_product_attention (causal);
  * RoPE "interleaved" == complex multiplication, "half" == permuted "interleaved";
  * whole-model logits with manual attention == with SDPA attention;
  * autograd gradients == finite differences (gradcheck on one parameter
    plus central-difference spot checks on entries of every parameter), for two
    dense and two MoE configs, and lighter spot checks of the gate, shared/routed
    expert and embedding gradients for the hash-layer MoE config;
  * MoE: with every expert selected (k = E, no renormalisation, scale 1) the layer
    equals shared + sum_e score_e * expert_e; the stable-sort top-k equals
    torch.topk on tie-free input.
For MoE fixtures the seed is chosen (BASE_SEED + index, then + 1000, + 2000, ...)
so that in every routed layer and token the gap between the k-th and (k+1)-th
largest (score + bias), in float64, exceeds MIN_TOPK_GAP (a float32 engine must
pick the same experts).

Usage (from the repo root):
    python reference/make_fixtures.py [--out crates/mnemo/tests/fixtures] [--only NAME ...]

DSA fixtures (DSA_FIXTURES: a lightning indexer + top-k sparse attention in every layer)
store the indexer parameters like any other; "grad.<name>" is the gradient of
LM loss + L_I (the mean over layers of the selected-set indexer KL, which reaches only the
indexer: its input and the attention target are detached, and the top-k mask carries no
gradient), "dsa_kl" [1] is L_I, "dsa.sel.{l}" (int64 [B*T, T], 1 = selected) each layer's
selection, and "warmup.dsa_kl" / "warmup.grad.<indexer param>" the same for the dense
warm-up loss (dense attention, KL over every s <= t). The seed is chosen so that every
row's k-th and (k+1)-th index scores differ by more than MIN_TOPK_GAP (float64).

Hyper-connection fixtures (HC_FIXTURES: residual = "mhc" / "hc") store the layers'
attn_hc.* / ffn_hc.* (and mHC's hc_head.*) parameters like any other; before writing
they are self-checked against finite differences, and the Sinkhorn variant against
the paper's Eq. 9 (exp, then alternating column/row normalisation of H_res).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import (MoE, Config, Transformer, apply_rope, Indexer,  # noqa: E402
                   manual_causal_attention, rope_cos_sin, sinkhorn, topk_lowest_index_first)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "crates", "mnemo", "tests", "fixtures")

PARAM_STD = 0.2          # std of matrices / embeddings (activations O(1))
NORM_STD = 0.1           # norm weights = 1 + NORM_STD * N(0, 1)
BASE_SEED = 20240601
GATE_BIAS_STD = 0.1      # MoE gate.bias (e_score_correction_bias) ~ N(0, 0.1^2)
MIN_TOPK_GAP = 2e-3      # required float64 gap between k-th and (k+1)-th (score + bias)

# name: V, d, L, H, KV, hd, rope_dim, layout, F, tied, B, T
FIXTURES = [
    ("mha_tied_interleaved",    64, 32, 2, 4, 4, 8, 8, "interleaved", 48, True, 2, 7),
    ("gqa_untied_half_partial", 64, 32, 2, 4, 2, 8, 4, "half", 40, False, 2, 9),
    ("mqa_tied_half",           64, 32, 2, 4, 1, 12, 8, "half", 40, True, 2, 11),
    ("gqa_long_untied",         96, 48, 1, 6, 3, 8, 8, "interleaved", 64, False, 1, 150),
]

# MoE fixtures: name, base args as above, then the MoE config keys.
MOE_SIGMOID = dict(ffn="moe", n_dense_layers=1, n_shared_experts=1, n_routed_experts=6,
                   moe_inter=16, top_k=2, score_func="sigmoid", routed_scaling_factor=2.5,
                   norm_topk_prob=True)
MOE_FIXTURES = [
    ("moe_sigmoid",           64, 32, 2, 4, 2, 8, 8, "interleaved", 48, True, 2, 9,
     MOE_SIGMOID),
    ("moe_sqrtsoftplus_hash", 64, 32, 2, 4, 2, 8, 8, "half", 48, False, 2, 11,
     dict(ffn="moe", n_dense_layers=0, num_hash_layers=1, n_shared_experts=2,
          n_routed_experts=8, moe_inter=12, top_k=3, score_func="sqrtsoftplus",
          routed_scaling_factor=1.5, norm_topk_prob=True)),
    ("moe_aux_noshared",      64, 32, 2, 4, 2, 8, 8, "interleaved", 48, True, 3, 8,
     dict(MOE_SIGMOID, n_shared_experts=0, norm_topk_prob=False, seq_aux_loss_coef=0.01,
          score_func="sqrtsoftplus")),
]


# Hyper-connection fixtures: name, base args as above, then the residual config keys.
HC_FIXTURES = [
    ("mhc_n4_gqa", 64, 32, 2, 4, 2, 8, 8, "interleaved", 48, True, 2, 7,
     dict(residual="mhc", hc_mult=4, hc_sinkhorn_iters=20)),
    ("hc_n3_untied", 64, 32, 2, 4, 2, 8, 4, "half", 40, False, 2, 9,
     dict(residual="hc", hc_mult=3)),
]


# DSA fixtures: name, base args as above, then the DSA config.
DSA_FIXTURES = [
    ("dsa_gqa_top5", 64, 32, 2, 4, 2, 8, 4, "half", 40, False, 2, 12,
     dict(dsa=dict(index_n_heads=3, index_head_dim=8, index_rope_dim=4, index_topk=5))),
]


def make_config(V, d, L, H, KV, hd, rope_dim, layout, Fh, tied, **moe) -> Config:
    return Config(vocab_size=V, d_model=d, n_layers=L, n_heads=H, n_kv_heads=KV,
                  head_dim=hd, rope_theta=10000.0, rope_dim=rope_dim, rope_layout=layout,
                  ffn_hidden=Fh, tied_embeddings=tied, norm_eps=1e-5, init_std=0.02,
                  max_seq_len=256, **moe)


def draw_fixture_inputs(cfg: Config, B: int, T: int, seed: int):
    """Returns (model in float32 with drawn params, tokens, targets)."""
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg, attn_impl="manual")
    with torch.no_grad():
        for name, p in model.named_parameters():  # deterministic registration order
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_STD * noise)
            else:
                p.copy_(PARAM_STD * noise)
        # MoE buffers (none for dense configs, so their random stream is unchanged)
        for _, moe in model.moe_layers():
            moe.gate.bias.copy_(GATE_BIAS_STD * torch.randn(
                moe.gate.bias.shape, generator=g, dtype=torch.float32))
        for _, moe in model.moe_layers():
            if moe.is_hash:
                moe.init_tid2eid(g)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g, dtype=torch.int64)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=g, dtype=torch.int64)
    return model, tokens, targets


# --------------------------------------------------------------------------
# Self-checks
# --------------------------------------------------------------------------

def check_attention_vs_sdpa():
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for (B, H, KV, T, hd) in [(2, 4, 4, 7, 8), (2, 4, 2, 9, 8), (1, 4, 1, 11, 12), (1, 6, 3, 150, 8)]:
        q = torch.randn(B, H, T, hd, generator=g, dtype=torch.float64)
        k = torch.randn(B, KV, T, hd, generator=g, dtype=torch.float64)
        v = torch.randn(B, KV, T, hd, generator=g, dtype=torch.float64)
        ours = manual_causal_attention(q, k, v)
        rep = H // KV
        ref = F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), is_causal=True)
        # also with an explicit boolean mask
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        ref2 = F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), attn_mask=mask)
        err = max((ours - ref).abs().max().item(), (ours - ref2).abs().max().item())
        worst = max(worst, err)
        assert err < 1e-12, f"manual attention != SDPA: {err}"
    print(f"[check] manual attention == SDPA (causal, GQA), max abs err {worst:.2e}")


def check_rope():
    g = torch.Generator().manual_seed(2)
    B, T, nh, hd, rd, theta = 2, 13, 3, 12, 8, 10000.0
    x = torch.randn(B, T, nh, hd, generator=g, dtype=torch.float64)
    cos, sin = rope_cos_sin(T, rd, theta, torch.float64, x.device)
    # interleaved == complex multiplication by exp(i * t * freq)
    y = apply_rope(x, cos, sin, rd, "interleaved")
    xc = torch.view_as_complex(x[..., :rd].reshape(B, T, nh, rd // 2, 2).contiguous())
    rot = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[None, :, None, :]
    yc = torch.view_as_real(xc * rot).flatten(-2)
    err_i = (y[..., :rd] - yc).abs().max().item()
    assert torch.equal(y[..., rd:], x[..., rd:]), "rope touched pass-through dims"
    # half == interleaved after permuting dims (i, i+half) <-> (2i, 2i+1)
    half = rd // 2
    perm = torch.empty(rd, dtype=torch.long)
    perm[0::2] = torch.arange(half)
    perm[1::2] = torch.arange(half) + half
    full_perm = torch.cat([perm, torch.arange(rd, hd)])
    inv = torch.argsort(full_perm)
    yh = apply_rope(x, cos, sin, rd, "half")
    yh_via_i = apply_rope(x[..., full_perm], cos, sin, rd, "interleaved")[..., inv]
    err_h = (yh - yh_via_i).abs().max().item()
    assert err_i < 1e-12 and err_h < 1e-12, (err_i, err_h)
    print(f"[check] rope interleaved == complex mult ({err_i:.1e}), half == permuted interleaved ({err_h:.1e})")


def check_model_sdpa(model64, tokens):
    with torch.no_grad():
        l_manual, _ = model64(tokens)
        model64.set_attn_impl("sdpa")
        l_sdpa, _ = model64(tokens)
        model64.set_attn_impl("manual")
    err = (l_manual - l_sdpa).abs().max().item()
    assert err < 1e-10, f"model logits manual vs sdpa differ: {err}"
    return err


def check_gradients(model64, tokens, targets, name):
    """Finite-difference checks in float64 on the given (float64) model."""
    params = dict(model64.named_parameters())

    # 1) torch.autograd.gradcheck of the loss w.r.t. one full parameter
    pname = "layers.0.attention.wq.weight"
    p0 = params[pname].detach().clone()

    def loss_of(w):
        # functional substitution of one parameter
        return torch.func.functional_call(model64, {pname: w}, (tokens, targets))[1]

    w = p0.clone().requires_grad_(True)
    ok = torch.autograd.gradcheck(loss_of, (w,), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert ok and torch.equal(params[pname].detach(), p0)
    print(f"[check] {name}: torch.autograd.gradcheck on {pname} passed")

    # 2) central-difference spot checks on a few entries of every parameter
    model64.zero_grad(set_to_none=True)
    _, loss = model64(tokens, targets)
    loss.backward()
    g = torch.Generator().manual_seed(3)
    worst_rel = 0.0
    h = 1e-6
    for pn, p in model64.named_parameters():
        flat = p.data.view(-1)
        gflat = p.grad.view(-1)
        idx = torch.randint(0, flat.numel(), (3,), generator=g).tolist()
        idx.append(int(gflat.abs().argmax()))
        for i in idx:
            orig = flat[i].item()
            with torch.no_grad():
                flat[i] = orig + h
                lp = model64(tokens, targets)[1].item()
                flat[i] = orig - h
                lm = model64(tokens, targets)[1].item()
                flat[i] = orig
            fd = (lp - lm) / (2 * h)
            ad = gflat[i].item()
            err = abs(fd - ad)
            rel = err / max(abs(ad), 1e-6)
            assert err < 1e-7 + 1e-5 * abs(ad), f"{pn}[{i}]: fd {fd} vs autograd {ad}"
            worst_rel = max(worst_rel, rel if abs(ad) > 1e-6 else 0.0)
    model64.zero_grad(set_to_none=True)
    print(f"[check] {name}: finite-difference spot checks on all params passed "
          f"(worst rel err {worst_rel:.1e})")


def check_moe_identities():
    """(a) k = E, no renormalisation, scale 1: MoE == shared + sum_e score_e * expert_e;
    (b) stable-sort top-k == torch.topk on tie-free keys; (c) hash layer selection."""
    g = torch.Generator().manual_seed(4)
    worst = 0.0
    for score_func, S in (("sigmoid", 1), ("sqrtsoftplus", 0), ("sqrtsoftplus", 2)):
        cfg = make_config(16, 8, 1, 2, 1, 4, 4, "half", 12, True, ffn="moe",
                          n_shared_experts=S, n_routed_experts=5, moe_inter=6, top_k=5,
                          score_func=score_func, routed_scaling_factor=1.0,
                          norm_topk_prob=False)
        moe = MoE(cfg, is_hash=False).to(torch.float64)
        with torch.no_grad():
            for p in moe.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            moe.gate.bias.copy_(torch.randn(5, generator=g, dtype=torch.float64))
        x = torch.randn(2, 7, 8, generator=g, dtype=torch.float64)
        tok = torch.randint(0, 16, (2, 7), generator=g)
        y, _ = moe(x, tok)
        f = x.reshape(-1, 8)
        lg = f @ moe.gate.weight.T
        sc = torch.sigmoid(lg) if score_func == "sigmoid" else torch.log1p(torch.exp(lg)).sqrt()
        ref = moe.shared_experts(f) if S > 0 else torch.zeros_like(f)
        for e in range(5):
            ref = ref + sc[:, e:e + 1] * moe.experts[e](f)
        err = (y.reshape(-1, 8) - ref).abs().max().item()
        worst = max(worst, err)
        assert err < 1e-12, f"MoE all-experts identity ({score_func}, S={S}): {err}"
    key = torch.randn(50, 9, generator=g, dtype=torch.float64)
    a = topk_lowest_index_first(key, 4).sort(dim=-1).values
    b = torch.topk(key, 4, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(a, b)
    tie = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]], dtype=torch.float64)
    assert topk_lowest_index_first(tie, 2).tolist() == [[1, 2]]
    # hash layer uses tid2eid[token]
    cfg = make_config(16, 8, 1, 2, 1, 4, 4, "half", 12, True, ffn="moe",
                      n_routed_experts=6, moe_inter=6, top_k=3, num_hash_layers=1)
    moe = MoE(cfg, is_hash=True)
    moe.init_tid2eid(g)
    assert all(len(set(r)) == 3 for r in moe.tid2eid.tolist())
    with torch.no_grad():
        moe.gate.weight.normal_(generator=g)
        tok = torch.randint(0, 16, (2, 5), generator=g)
        moe(torch.randn(2, 5, 8, generator=g), tok)
    assert torch.equal(moe.last_sel, moe.tid2eid[tok.reshape(-1)].long())
    print(f"[check] MoE: all-experts identity ({worst:.1e}), top-k tie order, hash routing")


def check_moe_grad_spots(model64, tokens, targets, name):
    """Light central-difference check of MoE-specific gradients: the largest and two
    random entries of every MoE layer's gate.weight, shared w1, the w2 of the expert
    with the largest gradient, and the embedding."""
    model64.zero_grad(set_to_none=True)
    model64(tokens, targets)[1].backward()
    params = dict(model64.named_parameters())
    names = ["tok_embeddings.weight"]
    for l, moe in model64.moe_layers():
        names.append(f"layers.{l}.ffn.gate.weight")
        if moe.shared_experts is not None:
            names.append(f"layers.{l}.ffn.shared_experts.w1.weight")
        e = max(range(len(moe.experts)), key=lambda e: moe.experts[e].w2.weight.grad.abs().max())
        names.append(f"layers.{l}.ffn.experts.{e}.w2.weight")
    g = torch.Generator().manual_seed(5)
    h, worst = 1e-6, 0.0
    for pn in names:
        flat, gflat = params[pn].data.view(-1), params[pn].grad.view(-1)
        idx = [int(gflat.abs().argmax())] + torch.randint(0, flat.numel(), (2,), generator=g).tolist()
        for i in idx:
            orig = flat[i].item()
            with torch.no_grad():
                flat[i] = orig + h
                lp = model64(tokens, targets)[1].item()
                flat[i] = orig - h
                lm = model64(tokens, targets)[1].item()
                flat[i] = orig
            fd, ad = (lp - lm) / (2 * h), gflat[i].item()
            assert abs(fd - ad) < 1e-7 + 1e-5 * abs(ad), f"{pn}[{i}]: fd {fd} vs autograd {ad}"
            if abs(ad) > 1e-6:
                worst = max(worst, abs(fd - ad) / abs(ad))
    model64.zero_grad(set_to_none=True)
    print(f"[check] {name}: finite-difference spot checks on {len(names)} MoE/embedding "
          f"params passed (worst rel err {worst:.1e})")


def min_topk_gap(model64, tokens):
    """Smallest float64 gap between the k-th and (k+1)-th largest (score + bias) over
    all tokens of all routed (non-hash) MoE layers (inf if there are none)."""
    with torch.no_grad():
        model64(tokens)
    gap = float("inf")
    k = model64.cfg.top_k
    for _, moe in model64.moe_layers():
        if moe.is_hash or k >= model64.cfg.n_routed_experts:
            continue
        srt = torch.sort(moe.last_key, dim=-1, descending=True).values
        gap = min(gap, (srt[:, k - 1] - srt[:, k]).min().item())
    return gap


def check_sinkhorn_eq9():
    """The kernels' Sinkhorn on comb = H_res^T equals the paper's Eq. 9 on H_res
    (M0 = exp(logits^T), 20 x (column step, row step)) up to the eps terms; H_res rows
    are exact (the last comb step normalises columns)."""
    g = torch.Generator().manual_seed(6)
    logits = 2.0 * torch.randn(50, 4, 4, generator=g, dtype=torch.float64)
    comb = sinkhorn(logits, 20, 1e-6)
    h = torch.exp(logits.transpose(-1, -2))
    for _ in range(20):
        h = h / h.sum(-2, keepdim=True)
        h = h / h.sum(-1, keepdim=True)
    err = (comb.transpose(-1, -2) - h).abs().max().item()
    row = (comb.transpose(-1, -2).sum(-1) - 1).abs().max().item()
    assert err < 5e-4 and row < 1e-5, (err, row)  # eps = 1e-6 vs exact division
    print(f"[check] Sinkhorn (softmax+eps, col first) == Eq. 9 on H_res ({err:.1e}); "
          f"H_res row sums exact ({row:.1e})")


def canonicalize_header(path: str):
    """Make the file byte-reproducible: safetensors writes __metadata__ keys in
    hash-map (random) order; rewrite the header JSON with them sorted. Tensor
    entries and data offsets are unchanged; the header keeps its length
    (space-padded, as safetensors itself pads)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":")).encode()
        assert len(new) <= n, (len(new), n)
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


# --------------------------------------------------------------------------

def build_fixture(cfg: Config, B: int, T: int, seed: int, name: str, deep_check: bool,
                  moe_spot_check: bool = False):
    model32, tokens, targets = draw_fixture_inputs(cfg, B, T, seed)
    params32 = {n: p.detach().clone() for n, p in model32.named_parameters()}
    buffers32 = {n: b.detach().clone() for n, b in model32.named_buffers()}

    model64 = model32.to(torch.float64)
    err = check_model_sdpa(model64, tokens)
    if deep_check:
        check_gradients(model64, tokens, targets, name)
    if moe_spot_check:
        check_moe_grad_spots(model64, tokens, targets, name)

    model64.zero_grad(set_to_none=True)
    logits, loss = model64(tokens, targets)
    loss.backward()

    # sanity: float64 params are exactly the stored float32 values
    for n, p in model64.named_parameters():
        assert torch.equal(p.detach().float(), params32[n])
    for n, b in model64.named_buffers():
        assert torch.equal(b.to(buffers32[n].dtype), buffers32[n])

    tensors = {"tokens": tokens.contiguous(), "targets": targets.contiguous()}
    for n, p in params32.items():
        tensors[n] = p.contiguous()
    for n, b in buffers32.items():   # MoE gate.bias (float32), tid2eid (int32)
        tensors[n] = b.contiguous()
    for l, moe in model64.moe_layers():
        tensors[f"moe.sel.{l}"] = moe.last_sel.sort(dim=-1).values.to(torch.int64).contiguous()
    tensors["logits"] = logits.detach().float().contiguous()
    tensors["loss"] = loss.detach().float().reshape(1).contiguous()
    for n, p in model64.named_parameters():
        tensors[f"grad.{n}"] = p.grad.detach().float().contiguous()
    metadata = {"config": cfg.to_json(), "batch": str(B), "seq_len": str(T)}

    gnorm = torch.sqrt(sum((p.grad ** 2).sum() for p in model64.parameters())).item()
    print(f"{name}: loss = {loss.item():.10f}  (logits std {logits.std().item():.3f}, "
          f"grad norm {gnorm:.4f}, manual-vs-sdpa {err:.1e})")
    if model64.last_aux is not None:
        print(f"  = CE {model64.last_ce.item():.10f} + {cfg.seq_aux_loss_coef} * "
              f"balance {model64.last_aux.item():.10f}")
    return tensors, metadata


def choose_moe_seed(cfg: Config, B: int, T: int, base_seed: int, name: str):
    """First seed base_seed + 1000*i (i = 0, 1, ...) whose routed top-k gaps all
    exceed MIN_TOPK_GAP. Returns (seed, smallest gap)."""
    for i in range(100):
        seed = base_seed + 1000 * i
        model32, tokens, _ = draw_fixture_inputs(cfg, B, T, seed)
        gap = min_topk_gap(model32.to(torch.float64), tokens)
        if gap > MIN_TOPK_GAP:
            print(f"{name}: seed {seed} (attempt {i}), smallest top-k gap {gap:.3e}")
            return seed, gap
        print(f"{name}: seed {seed} rejected, smallest top-k gap {gap:.3e}")
    raise RuntimeError(f"{name}: no seed with top-k gap > {MIN_TOPK_GAP}")


def dsa_min_gap(model64, tokens):
    """Smallest gap, over layers and query rows with more than k candidates, between the
    k-th and (k+1)-th largest causal index score (float64)."""
    gaps = []

    def hook(mod, inp, out):
        k = mod.cfg.dsa["index_topk"]
        T = out.shape[-1]
        for t in range(k, T):
            v = out[:, t, : t + 1].sort(dim=-1, descending=True).values
            gaps.append((v[:, k - 1] - v[:, k]).min().item())

    hs = [m.register_forward_hook(hook) for m in model64.modules() if isinstance(m, Indexer)]
    with torch.no_grad():
        model64(tokens)
    for h in hs:
        h.remove()
    return min(gaps)


def dsa_losses(model64, tokens, targets, stage):
    for blk in model64.layers:
        blk.dsa_stage = stage
    logits, loss = model64(tokens, targets)
    kl = sum(b.last_kl for b in model64.layers) / len(model64.layers)
    return logits, loss, kl


def check_dsa(model64, tokens, targets, name):
    """Self-checks: sparse == dense with k >= T; the indexer receives no LM gradient and the
    rest no KL gradient; the gradient of LM + L_I vs finite differences of the LM loss
    (model parameters) and of L_I (indexer parameters)."""
    import copy
    m = copy.deepcopy(model64)
    for b in m.layers:
        b.indexer.cfg = copy.deepcopy(b.indexer.cfg)
        b.indexer.cfg.dsa = dict(b.indexer.cfg.dsa, index_topk=tokens.shape[1])
    ld, _, _ = dsa_losses(m, tokens, targets, "sparse")
    lw, _, _ = dsa_losses(m, tokens, targets, "warmup")
    assert torch.allclose(ld, lw, atol=1e-12, rtol=0), "k >= T must equal dense attention"
    model64.zero_grad(set_to_none=True)
    _, loss, kl = dsa_losses(model64, tokens, targets, "sparse")
    gi = torch.autograd.grad(loss, [p for n, p in model64.named_parameters()],
                             allow_unused=True)
    for (n, _), g in zip(model64.named_parameters(), gi):
        if ".indexer." in n:
            assert g is None or g.abs().max().item() == 0.0, f"LM gradient reaches {n}"
    gk = torch.autograd.grad(kl, [p for n, p in model64.named_parameters()],
                             allow_unused=True)
    for (n, _), g in zip(model64.named_parameters(), gk):
        if ".indexer." not in n:
            assert g is None or g.abs().max().item() == 0.0, f"KL gradient reaches {n}"
    params = dict(model64.named_parameters())
    worst = 0.0
    for pname in ("layers.0.attention.wq.weight", "layers.1.indexer.wq",
                  "layers.0.indexer.k_norm.bias", "layers.1.indexer.weights_proj"):
        p = params[pname]
        model64.zero_grad(set_to_none=True)
        _, loss, kl = dsa_losses(model64, tokens, targets, "sparse")
        (loss + kl).backward()
        ana = p.grad.detach().clone()
        for i in range(0, p.numel(), max(1, p.numel() // 7)):
            with torch.no_grad():
                orig = p.view(-1)[i].item()
                p.view(-1)[i] = orig + 1e-6
                _, l1, k1 = dsa_losses(model64, tokens, targets, "sparse")
                p.view(-1)[i] = orig - 1e-6
                _, l2, k2 = dsa_losses(model64, tokens, targets, "sparse")
                p.view(-1)[i] = orig
            # The detached paths are invisible to autograd but not to finite differences:
            # the model's parameters are checked on the LM loss, the indexer's on L_I.
            num = ((k1 - k2) if ".indexer." in pname else (l1 - l2)).item() / 2e-6
            e = abs(num - ana.view(-1)[i].item()) / max(abs(num), 1e-6)
            if e > 1e-4:
                print("  FD", pname, i, num, ana.view(-1)[i].item())
            worst = max(worst, e)
    assert worst < 1e-4, f"{name}: DSA finite differences, worst relative error {worst:.2e}"
    print(f"{name}: DSA self-checks ok (k>=T == dense, detach, finite differences {worst:.1e})")


def build_dsa_fixture(cfg: Config, B: int, T: int, name: str):
    for i in range(100):
        seed = BASE_SEED + 300 + 1000 * i
        model32, tokens, targets = draw_fixture_inputs(cfg, B, T, seed)
        gap = dsa_min_gap(model32.to(torch.float64), tokens)   # (converts model32)
        if gap > MIN_TOPK_GAP:
            print(f"{name}: seed {seed} (attempt {i}), smallest index-score gap {gap:.3e}")
            break
    else:
        raise RuntimeError(f"{name}: no seed with an index-score gap > {MIN_TOPK_GAP}")
    model32, tokens, targets = draw_fixture_inputs(cfg, B, T, seed)
    params32 = {n: p.detach().clone() for n, p in model32.named_parameters()}
    model64 = model32.to(torch.float64)
    check_dsa(model64, tokens, targets, name)
    tensors = {"tokens": tokens.contiguous(), "targets": targets.contiguous()}
    for n, p in params32.items():
        tensors[n] = p.contiguous()
    # Warm-up stage: dense attention, only the indexer's KL gradient.
    model64.zero_grad(set_to_none=True)
    _, _, klw = dsa_losses(model64, tokens, targets, "warmup")
    klw.backward()
    for n, p in model64.named_parameters():
        if ".indexer." in n:
            tensors[f"warmup.grad.{n}"] = p.grad.detach().float().contiguous()
    tensors["warmup.dsa_kl"] = klw.detach().float().reshape(1)
    # Sparse stage.
    model64.zero_grad(set_to_none=True)
    logits, loss, kl = dsa_losses(model64, tokens, targets, "sparse")
    (loss + kl).backward()
    for l, blk in enumerate(model64.layers):
        tensors[f"dsa.sel.{l}"] = blk.last_keep.reshape(B * T, T).to(torch.int64).contiguous()
    tensors["logits"] = logits.detach().float().contiguous()
    tensors["loss"] = loss.detach().float().reshape(1).contiguous()
    tensors["dsa_kl"] = kl.detach().float().reshape(1).contiguous()
    for n, p in model64.named_parameters():
        tensors[f"grad.{n}"] = p.grad.detach().float().contiguous()
    print(f"{name}: loss = {loss.item():.10f}, L_I = {kl.item():.10f}, "
          f"warm-up L_I = {klw.item():.10f}")
    return tensors, {"config": cfg.to_json(), "batch": str(B), "seq_len": str(T)}


def write_fixture(path, tensors, metadata):
    save_file(tensors, path, metadata=metadata)
    canonicalize_header(path)
    with safe_open(path, "pt") as f:  # round-trip check
        assert f.metadata() == metadata and set(f.keys()) == set(tensors)
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    print(f"  wrote {os.path.relpath(path, REPO_ROOT)} ({os.path.getsize(path)} bytes)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="write only these fixtures")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    want = (lambda name: True) if not args.only else (lambda name: name in args.only)

    check_attention_vs_sdpa()
    check_rope()
    check_moe_identities()
    check_sinkhorn_eq9()

    os.makedirs(args.out, exist_ok=True)
    for name, V, d, L, H, KV, hd, rd, layout, Fh, tied, B, T, extra in DSA_FIXTURES:
        if not want(name):
            continue
        cfg = make_config(V, d, L, H, KV, hd, rd, layout, Fh, tied, **extra)
        tensors, metadata = build_dsa_fixture(cfg, B, T, name)
        write_fixture(os.path.join(args.out, f"{name}.safetensors"), tensors, metadata)
    for k, (name, V, d, L, H, KV, hd, rd, layout, Fh, tied, B, T, extra) in enumerate(HC_FIXTURES):
        if not want(name):
            continue
        cfg = make_config(V, d, L, H, KV, hd, rd, layout, Fh, tied, **extra)
        tensors, metadata = build_fixture(cfg, B, T, BASE_SEED + 100 + k, name, deep_check=True)
        write_fixture(os.path.join(args.out, f"{name}.safetensors"), tensors, metadata)
    for k, (name, V, d, L, H, KV, hd, rd, layout, Fh, tied, B, T) in enumerate(FIXTURES):
        if not want(name):
            continue
        cfg = make_config(V, d, L, H, KV, hd, rd, layout, Fh, tied)
        tensors, metadata = build_fixture(cfg, B, T, BASE_SEED + k, name,
                                          deep_check=(k in (0, 1)))
        write_fixture(os.path.join(args.out, f"{name}.safetensors"), tensors, metadata)
    for j, (name, V, d, L, H, KV, hd, rd, layout, Fh, tied, B, T, moe) in enumerate(MOE_FIXTURES):
        if not want(name):
            continue
        cfg = make_config(V, d, L, H, KV, hd, rd, layout, Fh, tied, **moe)
        seed, _ = choose_moe_seed(cfg, B, T, BASE_SEED + len(FIXTURES) + j, name)
        tensors, metadata = build_fixture(cfg, B, T, seed, name,
                                          deep_check=(name in ("moe_sigmoid", "moe_aux_noshared")),
                                          moe_spot_check=(name == "moe_sqrtsoftplus_hash"))
        write_fixture(os.path.join(args.out, f"{name}.safetensors"), tensors, metadata)
    print(f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
