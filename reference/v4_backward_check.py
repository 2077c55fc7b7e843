"""Checks the hand-written backward formulas of docs/deepseek-v4-equations.md §5 against
torch autograd (float64, random inputs). Plain torch; no transformers needed.

    python reference/v4_backward_check.py
"""

import torch
import torch.nn.functional as F

torch.manual_seed(0)
DT = torch.float64


def close(a, b, what):
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1e-12)
    assert err <= 1e-10 * max(scale, 1.0), f"{what}: {err}"
    print(f"[ok] {what}: max abs err {err:.1e}")


def leaf(*shape):
    return torch.randn(*shape, dtype=DT, requires_grad=True)


def rmsnorm():  # §5.2
    x, w = leaf(5, 7), leaf(7)
    eps = 1e-3
    r = (x.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    y = x * r * w
    gy = torch.randn_like(y)
    y.backward(gy)
    u = gy * w
    gx = r * u - x * r ** 3 * (u * x).sum(-1, keepdim=True) / x.shape[-1]
    gw = (gy * x * r).sum(0)
    close(gx, x.grad, "RMSNorm dx")
    close(gw, w.grad, "RMSNorm dw")


def rope_T():  # §5.3
    def rope(x, p, inv, a, sign):
        ang = p[:, None] * inv[None]
        C, S = ang.cos() * a, sign * ang.sin() * a
        u, v = x[..., 0::2], x[..., 1::2]
        return torch.stack([u * C - v * S, u * S + v * C], -1).flatten(-2)
    x = leaf(6, 8)
    p = torch.arange(6, dtype=DT) * 3.0
    inv = torch.rand(4, dtype=DT)
    for a in (1.0, 1.3):
        for sign in (1.0, -1.0):
            x.grad = None
            y = rope(x, p, inv, a, sign)
            gy = torch.randn_like(y)
            y.backward(gy)
            close(rope(gy, p, inv, a, -sign), x.grad, f"rope backward = opposite-sign rope (a={a}, sign={sign})")


def sink_attention():  # §5.4
    H, T, S, d = 3, 4, 6, 5
    q, kv, sink = leaf(T, H, d), leaf(S, d), leaf(H)
    vis = torch.rand(T, S) < 0.7
    vis[:, 0] = True
    sc = d ** -0.5
    l = torch.einsum("thd,sd->hts", q, kv) * sc
    l = l.masked_fill(~vis[None], float("-inf"))
    z = torch.cat([l, sink.view(H, 1, 1).expand(H, T, 1)], -1)
    P = z.softmax(-1)
    p, psink = P[..., :-1], P[..., -1]
    o = torch.einsum("hts,sd->thd", p, kv)
    go = torch.randn_like(o)
    o.backward(go)
    with torch.no_grad():
        g = torch.einsum("thd,sd->hts", go, kv)
        mu = (p * g).sum(-1, keepdim=True)
        gl = p * (g - mu)
        gsink = (-psink * mu[..., 0]).sum(-1)
        gq = sc * torch.einsum("hts,sd->thd", gl, kv)
        gkv = torch.einsum("hts,thd->sd", p, go) + sc * torch.einsum("hts,thd->sd", gl, q)
    close(gsink, sink.grad, "attention d sink")
    close(gq, q.grad, "attention dq")
    close(gkv, kv.grad, "attention dkv (key + value roles)")


def pooling():  # §5.6
    slots, c = 8, 5
    v, z = leaf(slots, c), leaf(slots, c)
    a = z.softmax(0)
    e = (a * v).sum(0)
    ge = torch.randn_like(e)
    e.backward(ge)
    with torch.no_grad():
        close(a * ge, v.grad, "pooling d value")
        close(a * (v - e) * ge, z.grad, "pooling d logit")


def sinkhorn():  # §5.7
    n, eps = 4, 1e-2
    Z = leaf(n, n)
    S = Z.softmax(-1)
    C0 = S + eps
    col = C0.sum(0, keepdim=True)
    C1 = C0 / (col + eps)
    row = C1.sum(1, keepdim=True)
    C2 = C1 / (row + eps)
    gC2 = torch.randn_like(C2)
    C2.backward(gC2)
    with torch.no_grad():
        gC1 = gC2 / (row + eps) - (gC2 * C1).sum(1, keepdim=True) / (row + eps) ** 2
        gC0 = gC1 / (col + eps) - (gC1 * C0).sum(0, keepdim=True) / (col + eps) ** 2
        gZ = S * (gC0 - (gC0 * S).sum(-1, keepdim=True))
    close(gZ, Z.grad, "softmax+eps, column step, row step")


def mhc_mix():  # §5.7, post / comb / collapse
    n, D = 3, 5
    X, post, C, pre, a = leaf(n, D), leaf(n), leaf(n, n), leaf(n), leaf(D)
    Xp = post[:, None] * a[None] + torch.einsum("jk,jd->kd", C, X)
    col = (pre[:, None] * X).sum(0)
    gXp, gcol = torch.randn_like(Xp), torch.randn_like(col)
    (Xp * gXp).sum().add_((col * gcol).sum()).backward()
    with torch.no_grad():
        close(gXp @ a, post.grad, "mHC d post")
        close((post[:, None] * gXp).sum(0), a.grad, "mHC d sublayer output")
        close(X @ gXp.T, C.grad, "mHC d comb (C̄[j,k] = X̄'[k]·X[j])")
        close(C @ gXp + pre[:, None] * gcol[None], X.grad, "mHC d streams")
        close(X @ gcol, pre.grad, "mHC d pre")


def moe_weights():  # §5.8
    E, k, rho = 6, 3, 2.5
    l = leaf(E)
    sel = torch.tensor([4, 1, 2])
    s = F.softplus(l).sqrt()
    ss = s[sel]
    Zt = ss.sum() + 1e-20
    w = rho * ss / Zt
    gw = torch.randn(k, dtype=DT)
    w.backward(gw)
    with torch.no_grad():
        gss = rho * (gw / Zt - (gw * ss).sum() / Zt ** 2)
        gs = torch.zeros(E, dtype=DT)
        gs[sel] = gss
        gl = gs * torch.sigmoid(l) / (2 * s)
    close(gl, l.grad, "MoE renormalised weights + sqrtsoftplus")


def swiglu():  # §5.8
    lam = 0.7
    g, u = leaf(50), leaf(50)
    gh_ = torch.randn(50, dtype=DT)
    gc = g.clamp(max=lam)
    uc = u.clamp(min=-lam, max=lam)
    h = F.silu(gc) * uc
    h.backward(gh_)
    with torch.no_grad():
        sg = torch.sigmoid(gc)
        gg = gh_ * uc * sg * (1 + gc * (1 - sg)) * (g < lam)
        gu = gh_ * F.silu(gc) * ((u > -lam) & (u < lam))
    close(gg, g.grad, "SwiGLU d gate (clamp from above)")
    close(gu, u.grad, "SwiGLU d up (clamp both sides)")
    x = torch.tensor([lam, -lam], dtype=DT, requires_grad=True)
    x.clamp(min=-lam, max=lam).sum().backward()
    assert x.grad.abs().sum() == 0, "clamp gradient at the edge is not 0"
    print("[ok] clamp gradient is 0 exactly at the edges (strict indicator)")


if __name__ == "__main__":
    rmsnorm()
    rope_T()
    sink_attention()
    pooling()
    sinkhorn()
    mhc_mix()
    moe_weights()
    swiglu()
    print("all backward formulas agree with autograd")
