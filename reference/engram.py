"""Standalone PyTorch/numpy reference of one Engram layer (spec engram.md §1.2-1.5), written
after the official demo (deepseek-ai/Engram, engram_demo_v1.py), and a fixture writer for the
Rust tests (crates/mnemo/tests/engram_fixtures.rs).

Differences from the demo, all needed to check mnemo and none changing the demo's numbers on
unpacked rows (checked below):
  * `pos[t]` (position inside the document) stops the hash look-back and the conv taps at
    document starts, so packed rows behave as separate documents;
  * the RMSNorm eps of the gate norms is float32's machine epsilon even in float64 (the demo's
    `nn.RMSNorm(eps=None)` in float32);
  * the conv may be absent (kernel 0, as in DeepSeek-V4.1).

Run from the repository root:
    reference/.venv/bin/python reference/engram.py            # self-checks + fixtures
"""

import argparse
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

F32_EPS = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------- hashing


def is_prime(n):
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    r = int(math.isqrt(n))
    for f in range(3, r + 1, 2):
        if n % f == 0:
            return False
    return True


def layer_primes(n_layers, vocab_per_order, n_head):
    """calculate_vocab_size_across_layers: one `seen` set across layers, restart per order."""
    seen, out = set(), []
    for _ in range(n_layers):
        primes = []
        for v in vocab_per_order:
            start = v - 1
            for _ in range(n_head):
                p = start + 1
                while not is_prime(p) or p in seen:
                    p += 1
                seen.add(p)
                primes.append(p)
                start = p
        out.append(primes)
    return out


def demo_multipliers(seed, layer_id, max_ngram, compressed_vocab):
    """The demo's draw: numpy PCG64 seeded with seed + 10007*layer_id."""
    m_max = np.iinfo(np.int64).max // compressed_vocab
    half = max(1, m_max // 2)
    rng = np.random.default_rng(int(seed + 10007 * int(layer_id)))
    r = rng.integers(low=0, high=half, size=(max_ngram,), dtype=np.int64)
    return [int(x) for x in (r * 2 + 1)]


def hash_local(ids, pos, mult, primes, n_head, pad):
    """Per-head local indices [N, (Nmax-1)*K] (numpy int64, as the demo)."""
    ids = np.asarray(ids, dtype=np.int64)
    pos = np.asarray(pos, dtype=np.int64)
    n = len(mult)
    shifts = []
    for k in range(n):
        s = np.full_like(ids, pad)
        idx = np.arange(len(ids))
        ok = k <= pos
        s[ok] = ids[idx[ok] - k]
        shifts.append(s)
    out = []
    mix = shifts[0] * np.int64(mult[0])
    for order in range(2, n + 1):
        mix = np.bitwise_xor(mix, shifts[order - 1] * np.int64(mult[order - 1]))
        for j in range(n_head):
            out.append(mix % np.int64(primes[(order - 2) * n_head + j]))
    return np.stack(out, axis=-1)


# ---------------------------------------------------------------------------- the layer


def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


class EngramLayer(torch.nn.Module):
    """MultiHeadEmbedding + gating (one branch per residual stream) + ShortConv."""

    def __init__(self, primes, head_dim, d, n_branch, kernel, dilation, dtype=torch.float64):
        super().__init__()
        self.primes, self.head_dim, self.d = primes, head_dim, d
        self.n_branch, self.kernel, self.dilation = n_branch, kernel, dilation
        d_mem = len(primes) * head_dim
        self.d_mem = d_mem
        off = [0]
        for p in primes[:-1]:
            off.append(off[-1] + p)
        self.register_buffer("offsets", torch.tensor(off, dtype=torch.int64))
        self.table = torch.nn.Embedding(sum(primes), head_dim, dtype=dtype)
        self.value_proj = torch.nn.Linear(d_mem, d, bias=True, dtype=dtype)
        self.key_projs = torch.nn.ModuleList(
            [torch.nn.Linear(d_mem, d, bias=True, dtype=dtype) for _ in range(n_branch)])
        self.norm1 = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.ones(d, dtype=dtype)) for _ in range(n_branch)])
        self.norm2 = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.ones(d, dtype=dtype)) for _ in range(n_branch)])
        if kernel > 0:
            self.conv_norms = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.ones(d, dtype=dtype)) for _ in range(n_branch)])
            self.conv_weight = torch.nn.Parameter(torch.zeros(n_branch * d, 1, kernel, dtype=dtype))

    def named_for_rust(self):
        """(rust name, tensor) in mnemo's GateSpec::tensors() naming."""
        out = [("value_proj.weight", self.value_proj.weight), ("value_proj.bias", self.value_proj.bias)]
        for m, k in enumerate(self.key_projs):
            out += [(f"key_projs.{m}.weight", k.weight), (f"key_projs.{m}.bias", k.bias)]
        out += [(f"norm1.{m}.weight", w) for m, w in enumerate(self.norm1)]
        out += [(f"norm2.{m}.weight", w) for m, w in enumerate(self.norm2)]
        if self.kernel > 0:
            out += [(f"short_conv.norms.{m}.weight", w) for m, w in enumerate(self.conv_norms)]
            out += [("short_conv.conv.weight", self.conv_weight)]
        return out

    def conv(self, x, pos):
        """Depthwise causal dilated conv over [N, C]; taps before the document start are 0."""
        n = x.shape[0]
        y = torch.zeros_like(x)
        w = self.conv_weight[:, 0, :]  # [C, K]
        for j in range(self.kernel):
            off = (self.kernel - 1 - j) * self.dilation
            if off >= n:
                continue
            shifted = torch.zeros_like(x)
            shifted[off:] = x[: n - off]
            mask = (pos >= off).to(x.dtype)[:, None]
            y = y + w[:, j] * shifted * mask
        return y

    def forward(self, local_idx, hidden, pos):
        """local_idx [N, H] int64, hidden [N, n, d], pos [N] int64 -> y [N, n, d]."""
        n_tok = local_idx.shape[0]
        e = self.table(local_idx + self.offsets).reshape(n_tok, self.d_mem)
        value = self.value_proj(e)
        gates = []
        for m in range(self.n_branch):
            k = rmsnorm(self.key_projs[m](e), self.norm1[m], F32_EPS)
            q = rmsnorm(hidden[:, m, :], self.norm2[m], F32_EPS)
            s = (k * q).sum(-1) / math.sqrt(self.d)
            s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
            gates.append(s.sigmoid())
        gates = torch.stack(gates, dim=1)[:, :, None]  # [N, n, 1]
        u = gates * value[:, None, :]  # [N, n, d]
        if self.kernel == 0:
            return u
        z = torch.cat([rmsnorm(u[:, m, :], self.conv_norms[m], 1e-5) for m in range(self.n_branch)], dim=-1)
        c = self.conv(z, pos)
        return u + F.silu(c).reshape(n_tok, self.n_branch, self.d)


# ---------------------------------------------------------------------------- self-checks


def check_spec_vectors():
    p = layer_primes(2, [646400, 646400], 8)
    assert p[0][:8] == [646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523]
    assert p[1][8:] == [646781, 646823, 646831, 646837, 646843, 646859, 646873, 646879]
    assert demo_multipliers(0, 1, 3, 98627) == [76993395940407, 4862694818241, 36129212583461]
    assert demo_multipliers(0, 15, 3, 98627) == [29055444938695, 56284491166079, 54183298291715]
    assert demo_multipliers(0, 2, 3, 98627) == [76868182044803, 37272711521967, 22754161933167]
    idx = hash_local([10, 20, 30, 40], [0, 1, 2, 3], demo_multipliers(0, 1, 3, 98627), p[0], 8, 2)
    assert list(idx[0]) == [333479, 339243, 28077, 138866, 265078, 318036, 621172, 346465,
                            173433, 263005, 495977, 206314, 275573, 461887, 366953, 446191]
    assert list(idx[3]) == [75563, 442366, 68304, 421160, 445228, 195553, 246065, 66463,
                            281032, 448564, 400683, 465246, 640961, 489514, 355769, 444093]


def check_autograd():
    """Autograd of the layer against finite differences (float64)."""
    torch.manual_seed(3)
    layer = EngramLayer([5, 7, 11, 13], 2, 4, 2, 4, 3)
    with torch.no_grad():
        layer.conv_weight.normal_()
    local = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [1, 2, 3, 4], [2, 0, 1, 3], [3, 3, 3, 3]])
    pos = torch.tensor([0, 1, 2, 0, 1])
    h = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(local, x, pos), (h,))
    w = layer.conv_weight
    assert torch.autograd.gradcheck(lambda x: layer.conv(x, pos), (torch.randn(5, 8, dtype=torch.float64, requires_grad=True),))
    del w


def check_conv_matches_demo():
    """On unpacked rows the masked conv is the demo's Conv1d(padding=(K-1)*dil)[..., :T]."""
    torch.manual_seed(0)
    layer = EngramLayer([5, 7], 2, 3, 2, 4, 3)
    with torch.no_grad():
        layer.conv_weight.normal_()
    t = 14
    x = torch.randn(t, 6, dtype=torch.float64)
    pos = torch.arange(t)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, bias=False, padding=9, dilation=3, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(layer.conv_weight)
        want = conv(x.T[None])[..., :t][0].T
    assert torch.allclose(layer.conv(x, pos), want, atol=1e-12)


# ---------------------------------------------------------------------------- fixtures


def make_fixture(name, *, n_branch, kernel, d, head_dim, n_head, max_ngram, vocab, layer_id,
                 compressed_vocab, pad, pos_rows, seed, out_dir):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    primes = layer_primes(1, vocab, n_head)[0]
    mult = demo_multipliers(0, layer_id, max_ngram, compressed_vocab)
    pos = np.concatenate([np.asarray(r, dtype=np.int64) for r in pos_rows])
    n_tok = len(pos)
    # Repeated n-grams so that some table rows are used several times.
    ids = rng.integers(0, compressed_vocab, size=n_tok).astype(np.int64)
    ids[n_tok // 2: n_tok // 2 + 4] = ids[1:5]
    local = hash_local(ids, pos, mult, primes, n_head, pad)
    layer = EngramLayer(primes, head_dim, d, n_branch, kernel, max_ngram)

    def f32(t):  # every input is an f32 value, computed with in f64
        return t.to(torch.float32).to(torch.float64)

    with torch.no_grad():
        for _, p in layer.named_for_rust():
            p.copy_(f32(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == d else 0.0)))
        for m in range(n_branch):  # biases: small, around 0
            layer.key_projs[m].bias.copy_(f32(torch.randn(d, dtype=torch.float64) * 0.1))
        layer.value_proj.bias.copy_(f32(torch.randn(d, dtype=torch.float64) * 0.1))
        layer.table.weight.copy_(f32(torch.randn_like(layer.table.weight)))
    hidden = f32(torch.randn(n_tok, n_branch, d, dtype=torch.float64)).requires_grad_(True)
    dy = f32(torch.randn(n_tok, n_branch, d, dtype=torch.float64))
    pos_t = torch.from_numpy(pos)
    y = layer(torch.from_numpy(local), hidden, pos_t)
    (y * dy).sum().backward()

    rows = local + np.asarray(layer.offsets)
    tensors = {
        "cids": torch.from_numpy(ids.astype(np.int32)),
        "pos": torch.from_numpy(pos.astype(np.int32)),
        "rows": torch.from_numpy(rows.astype(np.int32)),
        "table": layer.table.weight.detach().float(),
        "hidden": hidden.detach().float(),
        "dy": dy.float(),
        "y": y.detach().float(),
        "grad.hidden": hidden.grad.float(),
        "grad.table": layer.table.weight.grad.float(),
    }
    for n, p in layer.named_for_rust():
        tensors["param." + n] = p.detach().float().contiguous()
        tensors["grad." + n] = p.grad.float().contiguous()
    # One metadata key: safetensors writes its metadata map in hash order, so several keys
    # would make the file bytes vary from run to run.
    meta = {"fixture": json.dumps({
        "spec": {"d": d, "n_branch": n_branch, "kernel": kernel, "dilation": max_ngram,
                 "head_dim": head_dim},
        "hash": {"layer_id": layer_id, "max_ngram": max_ngram, "n_head": n_head,
                 "multipliers": mult, "primes": primes, "pad": pad,
                 "compressed_vocab": compressed_vocab},
    })}
    path = os.path.join(out_dir, f"engram_{name}.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
    print(f"{path}: {n_tok} tokens, {sum(primes)} rows, {len(np.unique(rows))} used, "
          f"{os.path.getsize(path)} bytes")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="crates/mnemo/tests/fixtures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    check_spec_vectors()
    check_conv_matches_demo()
    check_autograd()
    print("self-checks passed (spec primes/multipliers/hash vectors, conv = demo Conv1d, gradcheck)")
    # mHC (4 streams) with the conv; two rows, the first packing two documents.
    make_fixture("mhc_conv", n_branch=4, kernel=4, d=16, head_dim=8, n_head=2, max_ngram=3,
                 vocab=[61, 61], layer_id=1, compressed_vocab=50, pad=2,
                 pos_rows=[list(range(7)) + list(range(9)), list(range(16))], seed=1,
                 out_dir=args.out)
    # One plain residual stream, no conv (V4.1 style), orders 2..4.
    make_fixture("single_noconv", n_branch=1, kernel=0, d=12, head_dim=4, n_head=3, max_ngram=4,
                 vocab=[41, 43, 47], layer_id=14, compressed_vocab=30, pad=0,
                 pos_rows=[list(range(10)), list(range(4)) + list(range(6))], seed=2,
                 out_dir=args.out)


if __name__ == "__main__":
    main()
