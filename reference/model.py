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
  * RoPE on the first rope_dim dims of every q/k head, layout "interleaved"
    (pairs (2i, 2i+1)) or "half" (pairs (i, i + rope_dim/2), rotate-half/NeoX);
  * GQA: query head h reads kv head h // (n_heads / n_kv_heads).

The attention used for fixtures ("manual") is written out explicitly and does
not call F.scaled_dot_product_attention; the "sdpa" implementation is only for
the fast benchmark path (and is cross-checked against "manual" in
make_fixtures.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

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

    def __post_init__(self):
        # normalise numeric types (JSON may give 10000 for a float field)
        self.rope_theta = float(self.rope_theta)
        self.norm_eps = float(self.norm_eps)
        self.init_std = float(self.init_std)
        self.validate()

    def validate(self):
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        assert self.rope_dim % 2 == 0 and 0 <= self.rope_dim <= self.head_dim, \
            "rope_dim must be even and <= head_dim"
        assert self.rope_layout in ("interleaved", "half"), self.rope_layout
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                  "head_dim", "ffn_hidden", "max_seq_len"):
            assert getattr(self, f) > 0, f

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        missing = names - set(d)
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
        # field order == declaration order == the serde struct order
        return asdict(self)

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


def manual_causal_attention(q, k, v):
    """Explicit causal GQA attention.

    q: [B, H, T, hd], k/v: [B, KV, T, hd] -> [B, H, T, hd].
    Query head h uses kv head h // (H / KV).
    """
    B, H, T, hd = q.shape
    KV = k.shape[1]
    group = H // KV
    kv_index = torch.arange(H, device=q.device) // group
    k = k[:, kv_index]   # [B, H, T, hd]
    v = v[:, kv_index]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)              # [B, H, T(t), T(s)]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # s <= t
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

    def forward(self, x, cos, sin):
        cfg = self.cfg
        B, T, _ = x.shape
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = self.wq(x).view(B, T, H, hd)
        k = self.wk(x).view(B, T, KV, hd)
        v = self.wv(x).view(B, T, KV, hd)
        q = apply_rope(q, cos, sin, cfg.rope_dim, cfg.rope_layout)
        k = apply_rope(k, cos, sin, cfg.rope_dim, cfg.rope_layout)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, nh, T, hd]
        if self.attn_impl == "manual":
            o = manual_causal_attention(q, k, v)
        elif self.attn_impl == "sdpa":
            o = sdpa_causal_attention(q, k, v)
        else:
            raise ValueError(self.attn_impl)
        o = o.transpose(1, 2).reshape(B, T, H * hd)
        return self.wo(o)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)"""

    def __init__(self, cfg: Config):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)  # down

    def forward(self, x):
        g = self.w1(x)
        silu = g * torch.sigmoid(g)
        return self.w2(silu * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: Config, attn_impl: str = "manual"):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg, attn_impl)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, h, cos, sin):
        h = h + self.attention(self.attention_norm(h), cos, sin)
        h = h + self.feed_forward(self.ffn_norm(h))
        return h


class Transformer(nn.Module):
    def __init__(self, cfg: Config, attn_impl: str = "manual"):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg, attn_impl) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if not cfg.tied_embeddings:
            self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def set_attn_impl(self, attn_impl: str):
        for layer in self.layers:
            layer.attention.attn_impl = attn_impl

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """Default init: matrices ~ N(0, init_std^2), norm weights = 1."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, self.cfg.init_std, generator=generator)

    def output_weight(self):
        return self.tok_embeddings.weight if self.cfg.tied_embeddings else self.output.weight

    def forward(self, tokens, targets=None):
        """tokens: [B, T] int64 -> logits [B, T, V] (and mean CE loss if targets given)."""
        B, T = tokens.shape
        assert T <= self.cfg.max_seq_len
        h = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(T, self.cfg.rope_dim, self.cfg.rope_theta, h.dtype, h.device)
        for layer in self.layers:
            h = layer(h, cos, sin)
        hf = self.norm(h)
        logits = hf @ self.output_weight().T
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
