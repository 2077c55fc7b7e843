"""PyTorch reference model for mnemo ("V4-mini dense" decoder-only transformer).

This is a dev-time oracle, written independently of the Rust engine, plainly and
explicitly (nanoGPT style, one small module per concept). It is used to

  * generate numerical fixtures (logits, loss, gradients) computed in float64
    (see make_fixtures.py), and
  * provide a PyTorch baseline for the training-step benchmark (see bench_step.py).

Conventions (must match the Rust side):
  * linear weights are [out, in] (torch.nn.Linear), y = x @ W.T, no biases anywhere;
  * parameter names: tok_embeddings.weight, layers.{i}.attention_norm.weight,
    layers.{i}.attention.{wq,wk,wv,wo}.weight, layers.{i}.ffn_norm.weight,
    layers.{i}.feed_forward.{w1,w2,w3}.weight, norm.weight, and output.weight
    only when tied_embeddings is false;
  * optional DeepSeekMoE feed-forward (cfg.ffn == "moe"): layer l >= n_dense_layers
    has, instead of feed_forward.*, layers.{l}.ffn.gate.weight [E, d], the buffer
    layers.{l}.ffn.gate.bias [E] (selection only, not trained),
    layers.{l}.ffn.shared_experts.{w1,w3,w2}.weight (width S*I, if S > 0),
    layers.{l}.ffn.experts.{e}.{w1,w3,w2}.weight (width I), and on the first
    num_hash_layers MoE layers the int32 buffer layers.{l}.ffn.tid2eid [V, k]
    (experts chosen by token id). See MoE.forward;
  * RoPE on the first rope_dim dims of every q/k head, layout "interleaved"
    (pairs (2i, 2i+1)) or "half" (pairs (i, i + rope_dim/2), rotate-half/NeoX);
  * GQA: query head h reads kv head h // (n_heads / n_kv_heads).
  * optional hyper-connection residual (cfg.residual == "hc" | "mhc", n = hc_mult
    streams [B, T, n, d]): every attention and FFN sublayer has its own layer
    layers.{i}.attn_hc.* / layers.{i}.ffn_hc.*: for mHC fn [n(n+2), n*d], scale [3],
    base [n(n+2)] and the collapse head hc_head.{fn [n, n*d], scale [1], base [n]};
    for HC fn [n+2, d], scale [2], static_alpha [n, n+1], static_beta [n]
    (see MHCLayer, HCLayer, MHCHead; the equations are in crates/mnemo/src/mhc.rs).

The attention used for fixtures ("manual") is written out explicitly and does
not call F.scaled_dot_product_attention; the "sdpa" implementation is only for
the fast benchmark path (and is cross-checked against "manual" in
make_fixtures.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------

@dataclass
class Config:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    rope_dim: int
    rope_layout: str  # "interleaved" | "half"
    ffn_hidden: int
    tied_embeddings: bool
    norm_eps: float
    init_std: float
    max_seq_len: int
    # ---- DeepSeekMoE feed-forward (all optional; defaults = dense model) ----
    ffn: str = "dense"                  # "dense" | "moe"
    n_dense_layers: int = 0             # first layers keep the dense SwiGLU
    n_shared_experts: int = 0           # S: always-on experts (one SwiGLU of width S*moe_inter)
    n_routed_experts: int = 0           # E
    moe_inter: int = 0                  # I: hidden width of each expert
    top_k: int = 0                      # k experts per token
    score_func: str = "sqrtsoftplus"    # "sigmoid" | "sqrtsoftplus"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    num_hash_layers: int = 0            # first MoE layers route by token id (tid2eid)
    bias_update_speed: float = 0.001    # training-time update of gate.bias (not used here)
    seq_aux_loss_coef: float = 0.0      # sequence-wise balance loss weight
    # ---- hyper-connections (all optional; defaults = plain residual) ----
    residual: str = "plain"             # "plain" | "hc" | "mhc"
    hc_mult: int = 4                    # n streams
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # ---- DeepSeek Sparse Attention (optional; None = dense attention) ----
    # {"index_n_heads", "index_head_dim", "index_rope_dim", "index_topk"}; see Indexer.
    dsa: dict | None = None

    def __post_init__(self):
        # normalise numeric types (JSON may give 10000 for a float field)
        self.rope_theta = float(self.rope_theta)
        self.norm_eps = float(self.norm_eps)
        self.init_std = float(self.init_std)
        self.routed_scaling_factor = float(self.routed_scaling_factor)
        self.bias_update_speed = float(self.bias_update_speed)
        self.seq_aux_loss_coef = float(self.seq_aux_loss_coef)
        self.hc_eps = float(self.hc_eps)
        self.validate()

    def is_moe_layer(self, layer: int) -> bool:
        return self.ffn == "moe" and layer >= self.n_dense_layers

    def is_hash_layer(self, layer: int) -> bool:
        return self.is_moe_layer(layer) and (layer - self.n_dense_layers) < self.num_hash_layers

    def validate(self):
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        assert self.rope_dim % 2 == 0 and 0 <= self.rope_dim <= self.head_dim, \
            "rope_dim must be even and <= head_dim"
        assert self.rope_layout in ("interleaved", "half"), self.rope_layout
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                  "head_dim", "ffn_hidden", "max_seq_len"):
            assert getattr(self, f) > 0, f
        assert self.ffn in ("dense", "moe"), self.ffn
        assert self.residual in ("plain", "hc", "mhc"), self.residual
        if self.residual != "plain":
            assert self.hc_mult >= 1, "hc_mult must be >= 1"
            assert self.residual != "mhc" or self.hc_sinkhorn_iters >= 1, \
                "hc_sinkhorn_iters must be >= 1"
        assert self.score_func in ("sigmoid", "sqrtsoftplus"), self.score_func
        if self.dsa is not None:
            assert set(self.dsa) == {"index_n_heads", "index_head_dim", "index_rope_dim",
                                     "index_topk"}, self.dsa
            assert self.dsa["index_topk"] > 0 and self.dsa["index_n_heads"] > 0
            r = self.dsa["index_rope_dim"]
            assert r % 2 == 0 and r <= self.dsa["index_head_dim"]
            assert self.residual == "plain", "DSA needs the plain residual"
        for f in ("n_dense_layers", "n_shared_experts", "n_routed_experts", "moe_inter",
                  "top_k", "num_hash_layers"):
            assert getattr(self, f) >= 0, f
        if self.ffn == "moe":
            assert self.n_dense_layers <= self.n_layers, "n_dense_layers > n_layers"
            assert self.n_routed_experts > 0 and self.moe_inter > 0, "MoE needs experts"
            assert 0 < self.top_k <= self.n_routed_experts, "need 0 < top_k <= n_routed_experts"
            assert self.num_hash_layers <= self.n_layers - self.n_dense_layers, \
                "num_hash_layers > number of MoE layers"
            assert self.seq_aux_loss_coef >= 0.0

    # Keys of mnemo's model config that only steer training, never the forward or backward
    # pass this reference computes (the MoE router-bias refit: `moe::fit_bias`). `mnemo config`
    # prints them for every preset; they are accepted and dropped.
    TRAINING_ONLY_PREFIXES = ("bias_fit_",)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = {k: v for k, v in d.items() if not k.startswith(cls.TRAINING_ONLY_PREFIXES)}
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        unknown = set(d) - names
        missing = required - set(d)
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        if missing:
            raise ValueError(f"missing config keys: {sorted(missing)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "Config":
        return cls.from_dict(json.loads(s))

    @classmethod
    def load(cls, path: str) -> "Config":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        # field order == declaration order == the serde struct order.
        # The optional MoE keys are written only when one of them differs from its
        # default, so dense configs serialise exactly as before the MoE keys existed.
        d = asdict(self)
        if d["dsa"] is None:   # like serde's skip_serializing_if = "Option::is_none"
            del d["dsa"]
        optional = [f for f in fields(self) if f.default is not MISSING and f.name in d]
        if all(d[f.name] == f.default and type(d[f.name]) is type(f.default) for f in optional):
            for f in optional:
                del d[f.name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """rmsnorm(x, w) = x / sqrt(mean(x^2, last dim) + eps) * w"""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        ms = (x * x).mean(dim=-1, keepdim=True)
        return x / torch.sqrt(ms + self.eps) * self.weight


def rope_cos_sin(T: int, rope_dim: int, theta: float, dtype, device):
    """cos/sin tables of shape [T, rope_dim/2]; angle[t, i] = t * theta^(-2i/rope_dim).

    Computed in float64 and then cast to `dtype`.
    """
    half = rope_dim // 2
    i = torch.arange(half, dtype=torch.float64, device=device)
    freq = theta ** (-2.0 * i / rope_dim)                       # [half]
    t = torch.arange(T, dtype=torch.float64, device=device)     # [T]
    angle = t[:, None] * freq[None, :]                          # [T, half]
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


def apply_rope(x, cos, sin, rope_dim: int, layout: str):
    """x: [B, T, nh, hd]; cos/sin: [T, rope_dim/2]. Rotates the first rope_dim dims."""
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    xr, xpass = x[..., :rope_dim], x[..., rope_dim:]
    c = cos[None, :, None, :]   # [1, T, 1, half]
    s = sin[None, :, None, :]
    if layout == "interleaved":
        x0 = xr[..., 0::2]      # x[2i]
        x1 = xr[..., 1::2]      # x[2i+1]
        y0 = x0 * c - x1 * s
        y1 = x0 * s + x1 * c
        yr = torch.stack((y0, y1), dim=-1).flatten(-2)   # back to (2i, 2i+1) order
    elif layout == "half":
        x0 = xr[..., :half]     # x[i]
        x1 = xr[..., half:]     # x[i + half]
        y0 = x0 * c - x1 * s
        y1 = x0 * s + x1 * c
        yr = torch.cat((y0, y1), dim=-1)
    else:
        raise ValueError(layout)
    return torch.cat((yr, xpass), dim=-1)


def manual_causal_attention(q, k, v, keep=None):
    """Explicit causal GQA attention.

    q: [B, H, T, hd], k/v: [B, KV, T, hd] -> [B, H, T, hd].
    Query head h uses kv head h // (H / KV). `keep` ([B, T, T] bool, optional): the DSA
    top-k selection, shared by all heads, applied as a mask before the softmax.
    """
    B, H, T, hd = q.shape
    KV = k.shape[1]
    group = H // KV
    kv_index = torch.arange(H, device=q.device) // group
    k = k[:, kv_index]   # [B, H, T, hd]
    v = v[:, kv_index]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)              # [B, H, T(t), T(s)]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # s <= t
    if keep is not None:
        causal = causal[None, None] & keep[:, None]
    scores = scores.masked_fill(~causal, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return p @ v


def sdpa_causal_attention(q, k, v):
    """Fast path: F.scaled_dot_product_attention(is_causal=True) with GQA."""
    H, KV = q.shape[1], k.shape[1]
    if H != KV:
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        except TypeError:  # torch < 2.5 has no enable_gqa
            k = k.repeat_interleave(H // KV, dim=1)
            v = v.repeat_interleave(H // KV, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, cfg: Config, attn_impl: str = "manual"):
        super().__init__()
        self.cfg = cfg
        self.attn_impl = attn_impl
        H, KV, hd, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.wq = nn.Linear(d, H * hd, bias=False)
        self.wk = nn.Linear(d, KV * hd, bias=False)
        self.wv = nn.Linear(d, KV * hd, bias=False)
        self.wo = nn.Linear(H * hd, d, bias=False)

    def qk(self, x, cos, sin):
        """RoPE'd q [B, H, T, hd], k and v [B, KV, T, hd]."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = self.wq(x).view(B, T, H, hd)
        k = self.wk(x).view(B, T, KV, hd)
        v = self.wv(x).view(B, T, KV, hd)
        q = apply_rope(q, cos, sin, cfg.rope_dim, cfg.rope_layout)
        k = apply_rope(k, cos, sin, cfg.rope_dim, cfg.rope_layout)
        return (t.transpose(1, 2) for t in (q, k, v))  # [B, nh, T, hd]

    def forward(self, x, cos, sin, keep=None):
        cfg = self.cfg
        B, T, _ = x.shape
        H, hd = cfg.n_heads, cfg.head_dim
        q, k, v = self.qk(x, cos, sin)
        if keep is not None:
            o = manual_causal_attention(q, k, v, keep)
        elif self.attn_impl == "manual":
            o = manual_causal_attention(q, k, v)
        elif self.attn_impl == "sdpa":
            o = sdpa_causal_attention(q, k, v)
        else:
            raise ValueError(self.attn_impl)
        o = o.transpose(1, 2).reshape(B, T, H * hd)
        return self.wo(o)


class Indexer(nn.Module):
    """DeepSeek-V3.2 lightning indexer on the attention input x [B, T, d]:

        q = RoPE_half(x Wq^T)  [B, T, H_I, d_I]    (first index_rope_dim dims of each head)
        k = RoPE_half(LayerNorm(x Wk^T))  [B, T, d_I]     (eps 1e-6, weight and bias)
        w = (x Wproj^T) * H_I^-1/2 * d_I^-1/2  [B, T, H_I]
        I[b, t, s] = sum_j w[b,t,j] * relu(q[b,t,j] . k[b,s])     (-inf for s > t)

    Parameters layers.{i}.indexer.{wq [H_I*d_I, d], wk [d_I, d], k_norm.weight [d_I],
    k_norm.bias [d_I], weights_proj [H_I, d]} (plain tensors, no ".weight" on the linears).
    """

    def __init__(self, cfg: Config):
        super().__init__()
        c = cfg.dsa
        self.cfg = cfg
        hi, di, d = c["index_n_heads"], c["index_head_dim"], cfg.d_model
        self.wq = nn.Parameter(torch.empty(hi * di, d))
        self.wk = nn.Parameter(torch.empty(di, d))
        self.k_norm = nn.LayerNorm(di, eps=1e-6)
        self.weights_proj = nn.Parameter(torch.empty(hi, d))

    def forward(self, x):
        c = self.cfg.dsa
        B, T, _ = x.shape
        hi, di, rd = c["index_n_heads"], c["index_head_dim"], c["index_rope_dim"]
        cos, sin = rope_cos_sin(T, rd, self.cfg.rope_theta, x.dtype, x.device)
        q = apply_rope((x @ self.wq.T).view(B, T, hi, di), cos, sin, rd, "half")
        k = self.k_norm(x @ self.wk.T).view(B, T, 1, di)
        k = apply_rope(k, cos, sin, rd, "half")[:, :, 0]
        w = (x @ self.weights_proj.T) * (hi ** -0.5) * (di ** -0.5)
        z = torch.einsum("bthd,bsd->bths", q, k)
        idx = (w[..., None] * torch.relu(z)).sum(2)                      # [B, T, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return idx.masked_fill(~causal, float("-inf"))


def topk_mask(index_scores, k: int):
    """[B, T, T] bool: per query t the top-min(k, t+1) causal positions of the scores."""
    T = index_scores.shape[-1]
    top = index_scores.topk(min(k, T), dim=-1).indices
    keep = torch.zeros_like(index_scores, dtype=torch.bool).scatter(-1, top, True)
    causal = torch.ones(T, T, dtype=torch.bool, device=index_scores.device).tril()
    return keep & causal


def head_summed_attention(q, k, keep=None):
    """p[b, t, s] = (1/H) sum_h softmax_h(q k^T / sqrt(hd) + mask)  (L1-normalised over s)."""
    B, H, T, hd = q.shape
    kv_index = torch.arange(H, device=q.device) // (H // k.shape[1])
    scores = (q @ k[:, kv_index].transpose(-2, -1)) / math.sqrt(hd)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]
    if keep is not None:
        causal = causal & keep[:, None]
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).sum(1)
    return p / p.sum(-1, keepdim=True)


def indexer_kl(p, index_scores, keep):
    """Mean over (b, t) of KL(p_t || softmax(I_t)) over the positions in `keep` (p is 0
    elsewhere and already normalised over them)."""
    logq = torch.log_softmax(index_scores.masked_fill(~keep, float("-inf")), dim=-1)
    logq = logq.masked_fill(~keep, 0.0)   # no -inf (and so no NaN gradient) off the set
    terms = torch.where(keep & (p > 0), p * (torch.log(p.clamp_min(1e-300)) - logq),
                        torch.zeros_like(p))
    return terms.sum(-1).mean()


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), hidden width `hidden`."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down

    def forward(self, x):
        g = self.w1(x)
        silu = g * torch.sigmoid(g)
        return self.w2(silu * self.w3(x))


class FeedForward(SwiGLU):
    """Dense SwiGLU feed-forward of width cfg.ffn_hidden."""

    def __init__(self, cfg: Config):
        super().__init__(cfg.d_model, cfg.ffn_hidden)


class Gate(nn.Module):
    """Router: weight [E, d] (trained); bias [E] is a buffer (DeepSeek's
    e_score_correction_bias), used only to choose the top-k, never differentiated."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.d_model))
        self.register_buffer("bias", torch.zeros(cfg.n_routed_experts))


def moe_scores(logits, score_func: str):
    if score_func == "sigmoid":
        return torch.sigmoid(logits)
    if score_func == "sqrtsoftplus":
        return torch.sqrt(F.softplus(logits))
    raise ValueError(score_func)


def topk_lowest_index_first(key, k: int):
    """Indices of the k largest entries of each row of key [N, E]; among equal
    values the lower index wins (stable descending sort)."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :k]


class MoE(nn.Module):
    """DeepSeekMoE feed-forward: shared experts + top-k routed experts.

    Parameter names (under layers.{l}.ffn.): gate.weight, gate.bias (buffer),
    shared_experts.{w1,w3,w2}.weight (if n_shared_experts > 0),
    experts.{e}.{w1,w3,w2}.weight, and tid2eid (int32 buffer [V, k]) on hash layers.
    """

    def __init__(self, cfg: Config, is_hash: bool):
        super().__init__()
        self.cfg = cfg
        self.is_hash = is_hash
        E, S, I, d = cfg.n_routed_experts, cfg.n_shared_experts, cfg.moe_inter, cfg.d_model
        self.gate = Gate(cfg)
        # S shared experts of width I == one SwiGLU of width S*I
        self.shared_experts = SwiGLU(d, S * I) if S > 0 else None
        self.experts = nn.ModuleList([SwiGLU(d, I) for _ in range(E)])
        if is_hash:
            self.register_buffer(
                "tid2eid", torch.zeros(cfg.vocab_size, cfg.top_k, dtype=torch.int32))
        # filled by forward(), for inspection / fixtures
        self.last_sel = None
        self.last_key = None

    @torch.no_grad()
    def init_tid2eid(self, generator: torch.Generator | None = None):
        """Random table: for each token id, top_k distinct expert ids."""
        E, k = self.cfg.n_routed_experts, self.cfg.top_k
        for v in range(self.cfg.vocab_size):
            perm = torch.randperm(E, generator=generator)[:k]
            self.tid2eid[v] = perm.to(torch.int32)

    def forward(self, x, tokens):
        """x: [B, T, d] (already ffn_norm'ed), tokens: [B, T] -> (y [B, T, d], aux or None)."""
        cfg = self.cfg
        B, T, d = x.shape
        N, E, k = B * T, cfg.n_routed_experts, cfg.top_k
        f = x.reshape(N, d)
        tok = tokens.reshape(N)

        logits = f @ self.gate.weight.T                       # [N, E]
        scores = moe_scores(logits, cfg.score_func)           # [N, E]

        # expert selection: a constant (no gradient through the choice)
        with torch.no_grad():
            if self.is_hash:
                sel = self.tid2eid[tok].long()                  # [N, k]
                self.last_key = None
            else:
                key = scores.detach() + self.gate.bias          # bias only for selection
                sel = topk_lowest_index_first(key, k)           # [N, k]
                self.last_key = key
        self.last_sel = sel

        w = scores.gather(1, sel)                             # [N, k], differentiable
        if cfg.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        w = w * cfg.routed_scaling_factor

        if self.shared_experts is not None:
            y = self.shared_experts(f)
        else:
            y = torch.zeros_like(f)
        for e in range(E):
            hit = sel == e                                    # [N, k]; at most one True per row
            rows = hit.any(dim=-1).nonzero(as_tuple=True)[0]  # tokens routed to expert e
            if rows.numel() == 0:
                continue
            we = (w * hit.to(w.dtype)).sum(dim=-1)            # [N], weight of expert e
            ye = self.experts[e](f[rows]) * we[rows, None]
            y = y.index_add(0, rows, ye)

        aux = None
        if cfg.seq_aux_loss_coef > 0 and not self.is_hash:
            # sequence-wise balance loss, per sequence b of T tokens:
            #   f_e = E/(k T) * #{t : e in sel_{b,t}}  (constant)
            #   P_e = (1/T) sum_t s'_{b,t,e},  s' = scores / sum_e scores
            #   L_b = sum_e f_e P_e;  aux = mean_b L_b
            with torch.no_grad():
                onehot = torch.zeros(N, E, dtype=scores.dtype, device=scores.device)
                onehot.scatter_(1, sel, 1.0)
                counts = onehot.reshape(B, T, E).sum(dim=1)          # [B, E]
                fe = counts * (E / (k * T))
            sn = scores / scores.sum(dim=-1, keepdim=True)
            P = sn.reshape(B, T, E).mean(dim=1)                      # [B, E]
            aux = (fe * P).sum(dim=-1).mean()
        return y.reshape(B, T, d), aux


# --------------------------------------------------------------------------
# Hyper-connections (HC, arXiv 2409.19606) and mHC (arXiv 2512.24880)
# --------------------------------------------------------------------------

def sinkhorn(logits, iters: int, eps: float):
    """TileKernels' sinkhorn_normalize_ref on comb = (H_res)^T, logits [..., n, n]:
    row softmax + eps, a column step, then (iters - 1) x (row step, column step)."""
    comb = torch.softmax(logits, dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


class MHCLayer(nn.Module):
    """mHC coefficients of one sublayer from the streams x [B, T, n, d]:
    mixes = (x_flat @ fn.T) * rsqrt(mean(x_flat^2) + norm_eps) (one statistic over n*d),
    m = mixes * [scale0 (n) | scale1 (n) | scale2 (n^2)] + base,
    pre = sigmoid(m[:n]) + eps, post = 2 sigmoid(m[n:2n]), comb = sinkhorn(m[2n:])."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.hc_mult, cfg.d_model
        self.fn = nn.Parameter(torch.zeros(n * (n + 2), n * d))
        self.scale = nn.Parameter(torch.zeros(3))
        self.base = nn.Parameter(torch.zeros(n * (n + 2)))

    def forward(self, x):
        cfg = self.cfg
        B, T, n, d = x.shape
        xf = x.reshape(B, T, n * d)
        r = torch.rsqrt((xf * xf).mean(-1, keepdim=True) + cfg.norm_eps)
        mixes = (xf @ self.fn.T) * r
        s = torch.cat([self.scale[0].expand(n), self.scale[1].expand(n),
                       self.scale[2].expand(n * n)])
        m = mixes * s + self.base
        pre = torch.sigmoid(m[..., :n]) + cfg.hc_eps
        post = 2.0 * torch.sigmoid(m[..., n:2 * n])
        comb = sinkhorn(m[..., 2 * n:].reshape(B, T, n, n), cfg.hc_sinkhorn_iters, cfg.hc_eps)
        return pre, post, comb


class HCLayer(nn.Module):
    """HC coefficients (HC paper App. J) from the streams x [B, T, n, d]: per stream a
    parameter-free RMS norm over d, a = tanh(norm_x @ fn.T) [.., n, n+2],
    alpha = static_alpha + scale0 * a[..., :n+1], beta = static_beta + scale1 * a[..., n+1];
    pre = alpha[..., 0], comb = alpha[..., 1:], post = beta."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.hc_mult, cfg.d_model
        self.fn = nn.Parameter(torch.zeros(n + 2, d))
        self.scale = nn.Parameter(torch.zeros(2))
        self.static_alpha = nn.Parameter(torch.zeros(n, n + 1))
        self.static_beta = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        n = self.cfg.hc_mult
        xn = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.cfg.norm_eps)
        a = torch.tanh(xn @ self.fn.T)
        alpha = self.static_alpha + self.scale[0] * a[..., :n + 1]
        beta = self.static_beta + self.scale[1] * a[..., n + 1]
        return alpha[..., 0], beta, alpha[..., 1:]


class MHCHead(nn.Module):
    """mHC collapse ("pre-only" mHC): w = sigmoid(mixes * scale + base) + eps,
    h = sum_m w[m] x[m]."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.hc_mult, cfg.d_model
        self.fn = nn.Parameter(torch.zeros(n, n * d))
        self.scale = nn.Parameter(torch.zeros(1))
        self.base = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        B, T, n, d = x.shape
        xf = x.reshape(B, T, n * d)
        r = torch.rsqrt((xf * xf).mean(-1, keepdim=True) + self.cfg.norm_eps)
        w = torch.sigmoid((xf @ self.fn.T) * r * self.scale + self.base) + self.cfg.hc_eps
        return (w.unsqueeze(-1) * x).sum(-2)


def hc_readout(x, pre):
    """y = sum_j pre[j] x[j]: x [B, T, n, d], pre [B, T, n] -> [B, T, d]."""
    return (pre.unsqueeze(-1) * x).sum(-2)


def hc_merge(x, out, post, comb):
    """x'[k] = sum_j comb[j, k] x[j] + post[k] out (comb = H_res^T, the kernels' orientation)."""
    return torch.einsum("btjk,btjc->btkc", comb, x) + post.unsqueeze(-1) * out.unsqueeze(-2)


class Block(nn.Module):
    def __init__(self, cfg: Config, attn_impl: str = "manual", layer_id: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg, attn_impl)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.is_moe_layer(layer_id):
            self.ffn = MoE(cfg, is_hash=cfg.is_hash_layer(layer_id))
        else:
            self.feed_forward = FeedForward(cfg)
        if cfg.residual != "plain":
            layer = MHCLayer if cfg.residual == "mhc" else HCLayer
            self.attn_hc = layer(cfg)
            self.ffn_hc = layer(cfg)
        if cfg.dsa is not None:
            self.indexer = Indexer(cfg)
        self.dsa_stage = "sparse"
        self.last_kl = None
        self.last_keep = None

    def _ffn(self, x, tokens):
        if hasattr(self, "ffn"):
            return self.ffn(x, tokens)
        return self.feed_forward(x), None

    def forward(self, h, cos, sin, tokens=None):
        """-> (h, aux balance loss of this layer or None). With hyper-connections h is the
        stream tensor [B, T, n, d]."""
        if hasattr(self, "attn_hc"):
            pre, post, comb = self.attn_hc(h)
            out = self.attention(self.attention_norm(hc_readout(h, pre)), cos, sin)
            h = hc_merge(h, out, post, comb)
            pre, post, comb = self.ffn_hc(h)
            out, aux = self._ffn(self.ffn_norm(hc_readout(h, pre)), tokens)
            return hc_merge(h, out, post, comb), aux
        if hasattr(self, "indexer"):
            return self._forward_dsa(h, cos, sin, tokens)
        h = h + self.attention(self.attention_norm(h), cos, sin)
        y, aux = self._ffn(self.ffn_norm(h), tokens)
        return h + y, aux

    def _forward_dsa(self, h, cos, sin, tokens):
        """DSA layer. The indexer reads the detached attention input; its KL loss (against
        the detached head-summed attention) is left in self.last_kl. Stage "sparse": top-k
        attention, KL over the selected set; "warmup": dense attention, KL over s <= t."""
        x = self.attention_norm(h)
        I = self.indexer(x.detach())
        keep = topk_mask(I.detach(), self.indexer.cfg.dsa["index_topk"])
        self.last_keep = keep
        q, k, _ = self.attention.qk(x, cos, sin)
        if self.dsa_stage == "sparse":
            out = self.attention(x, cos, sin, keep)
            p = head_summed_attention(q.detach(), k.detach(), keep)
            self.last_kl = indexer_kl(p, I, keep)
        else:
            out = self.attention(x, cos, sin)
            p = head_summed_attention(q.detach(), k.detach())
            T = I.shape[-1]
            causal = torch.ones(T, T, dtype=torch.bool, device=I.device).tril()
            self.last_kl = indexer_kl(p, I, causal.expand_as(keep))
        h = h + out
        y, aux = self._ffn(self.ffn_norm(h), tokens)
        return h + y, aux


class Transformer(nn.Module):
    def __init__(self, cfg: Config, attn_impl: str = "manual"):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg, attn_impl, l) for l in range(cfg.n_layers)])
        if cfg.residual == "mhc":
            self.hc_head = MHCHead(cfg)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tied_embeddings:
            self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.last_ce = None
        self.last_aux = None
        self.reset_parameters()

    def set_attn_impl(self, attn_impl: str):
        for layer in self.layers:
            layer.attention.attn_impl = attn_impl

    def moe_layers(self):
        """[(layer index, MoE module)] for the MoE layers."""
        return [(l, b.ffn) for l, b in enumerate(self.layers) if hasattr(b, "ffn")]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Default init: matrices ~ N(0, init_std^2), norm weights = 1; MoE gate.bias = 0,
        hash tables random."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("k_norm.bias"):
                p.zero_()
            else:
                p.normal_(0.0, self.cfg.init_std, generator=generator)
        for _, moe in self.moe_layers():
            moe.gate.bias.zero_()
            if moe.is_hash:
                moe.init_tid2eid(generator)
        # Hyper-connections (the Rust engine's documented init, see mhc.rs): mHC fn ~ N(0,
        # init_std^2), scale 0.01, base 0; HC fn 0, scale 0.01, static_alpha [e_{s mod n} | I]
        # for sublayer s (attention 2i, FFN 2i+1), static_beta 1.
        n = self.cfg.hc_mult
        for name, mod in self.named_modules():
            if isinstance(mod, (MHCLayer, MHCHead)):
                mod.scale.fill_(0.01)
                mod.base.zero_()
            elif isinstance(mod, HCLayer):
                i = int(name.split(".")[1])
                s = 2 * i + (1 if name.endswith("ffn_hc") else 0)
                mod.fn.zero_()
                mod.scale.fill_(0.01)
                mod.static_alpha.zero_()
                mod.static_alpha[s % n, 0] = 1.0
                mod.static_alpha[:, 1:] = torch.eye(n)
                mod.static_beta.fill_(1.0)

    def output_weight(self):
        return self.tok_embeddings.weight if self.cfg.tied_embeddings else self.output.weight

    def forward(self, tokens, targets=None):
        """tokens: [B, T] int64 -> logits [B, T, V] (and loss if targets given:
        mean CE + seq_aux_loss_coef * sum over MoE layers of the balance loss)."""
        B, T = tokens.shape
        assert T <= self.cfg.max_seq_len
        h = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(T, self.cfg.rope_dim, self.cfg.rope_theta, h.dtype, h.device)
        if self.cfg.residual != "plain":   # expand once to n streams
            h = h.unsqueeze(-2).repeat(1, 1, self.cfg.hc_mult, 1)
        aux_total = None
        for layer in self.layers:
            h, aux = layer(h, cos, sin, tokens)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        if self.cfg.residual == "mhc":     # collapse once: mHC head, or HC's plain sum
            h = self.hc_head(h)
        elif self.cfg.residual == "hc":
            h = h.sum(-2)
        hf = self.norm(h)
        logits = hf @ self.output_weight().T
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))
        self.last_ce, self.last_aux = loss, aux_total
        if aux_total is not None:
            loss = loss + self.cfg.seq_aux_loss_coef * aux_total
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
