//! Hyper-connections: the `n`-stream residual of HC (Zhu et al., arXiv 2409.19606) and of
//! mHC, manifold-constrained HC (DeepSeek, arXiv 2512.24880), forward and backward.
//!
//! The residual stream is `x ∈ R^{n×C}` per token, stored `[T, n, d]` (token-major, then stream,
//! then channel) between all sublayers: expanded once after the embedding (`x[k] = h⁰` for every
//! stream k) and collapsed once before the final norm. Every attention and every FFN sublayer
//! is one hyper-connection layer with its own parameters (paper Eq. 3):
//!
//! ```text
//! x_{l+1} = H^res_l · x_l + (H^post_l)ᵀ · F(RMSNorm(H^pre_l · x_l))
//! ```
//!
//! stored as the kernels store it: `pre [n]`, `post [n]` and `comb [n, n]` with
//! `comb = (H^res)ᵀ`, i.e. (spec §3 item 7)
//!
//! ```text
//! y        = Σ_j pre[j] · x[j]                               read-out            [d]
//! x'[k]    = Σ_j comb[j, k] · x[j] + post[k] · F(RMSNorm(y))  merge               [n, d]
//! ```
//!
//! **mHC coefficients** (Eq. 7–9 in the fused kernel form, Eq. 14–19), per token, with
//! `x_flat = vec(x) ∈ R^{nd}`, `m = n(n+2)`, parameters `fn [m, nd]`, `scale [3]`, `base [m]`:
//!
//! ```text
//! raw  = x_flat · fnᵀ                        (one GEMM [T, nd]·[nd, m] for all tokens)
//! r    = 1 / sqrt(Σ x_flat² / (nd) + ε_norm)  (one RMS statistic per token, over all n·d)
//! mix  = raw · r · scale[g(i)] + base        (g = 0 pre, 1 post, 2 res; bias after the rsqrt)
//! pre  = σ(mix[0..n]) + ε                    post = 2·σ(mix[n..2n])
//! comb = Sinkhorn(mix[2n..] as [n, n], row-major)
//! ```
//!
//! `Sinkhorn` is the kernels' variant (spec §3 item 6): `P = softmax_rows(L) + ε`, then a column
//! step `P /= colsum(P) + ε`, then `iters − 1` times (row step, column step). In comb space the
//! last step normalises columns, so the rows of `H^res = combᵀ` are exact. All of it is f32.
//!
//! **HC coefficients** (HC paper §1/App. J): per stream j, a parameter-free RMS norm over d
//! (`x̂_j = x_j · rstd_j`; the paper's LayerNorm, whose affine weight would be absorbed into
//! `W`), then with `W = fn [n+2, d]` (rows `0..=n`: `W_α`, row `n+1`: `w_β`), `scale [2]`
//! (`s_α`, `s_β`) and the static block `[static_α (n×(n+1)) | static_β (n)]`:
//!
//! ```text
//! a_j   = tanh(x̂_j · Wᵀ)                                        [n+2]
//! α[j]  = static_α[j] + s_α · a_j[0..=n]     pre[j] = α[j, 0]   comb[j, k] = α[j, 1+k]
//! β[j]  = static_β[j] + s_β · a_j[n+1]       post[j] = β[j]
//! ```
//!
//! Both share the read-out and merge kernels; only the coefficients differ. The final collapse
//! is the plain sum of the streams for HC, and for mHC the "pre-only" head (spec §3 item 11):
//! `w = σ(raw · r · scale_head + base_head) + ε` from `fn_head [n, nd]`, `h = Σ_m w[m] · x[m]`.
//!
//! **Shapes** inside this module: `x: [T, n, d]`, `ssq: [T, n]` (sum of squares of every
//! stream, produced by the merge of the previous layer or by the expansion: the RMS statistic
//! costs no extra pass over the streams), `pre, post: [T, n]`, `comb: [T, n, n]`.
//!
//! **Fusion.** The coefficient GEMM reads the streams once; the RMS statistic comes for free
//! from the merge that wrote them. The merge applies `H^res` and `H^post` and adds the sublayer
//! output in one pass per token, writing `x'` and its per-stream sums of squares. Backward:
//! one pass per token computes `d out`, `d post`, `d comb` and `dx = comb · dx'`; a second pass
//! computes `d pre`, the read-out gradient and the whole coefficient backward (sigmoid,
//! Sinkhorn, scale, bias, RMS statistic); two GEMMs give `dx += d raw · fn` and `d fn`.
//!
//! **Sinkhorn backward: replay in reverse.** The forward stores only the logits `mix[2n..]`.
//! The backward recomputes the `2·iters` intermediate `n×n` matrices of one token into a small
//! scratch buffer and walks back through them (spec §4): a column step `y = x / (s + ε)` has
//! `dx_jk = (g_jk − Σ_i g_ik y_ik) / (s_k + ε)` (rows alike), the `+ε` passes the gradient, and
//! the softmax gives `dL = P ⊙ (g − Σ_k g ⊙ P)`. This is the exact gradient of the 20-iteration
//! map (not the implicit-function gradient at the fixed point); it matches finite differences
//! (`sinkhorn_gradient_matches_finite_differences_at_20_iterations`).
//!
//! **Initialisation** (the paper specifies only α = 0.01, spec §5). mHC: `fn ~ N(0, init_std²)`,
//! `scale = (0.01, 0.01, 0.01)`, `base = 0` (also for the head). With identical streams at
//! the start this makes every mHC layer exactly a plain residual layer up to the small dynamic
//! term: `H^pre ≈ 0.5` (the read-out is 2·h, and the block RMSNorm removes the factor),
//! `H^post ≈ 1`, `H^res ≈` uniform `1/n` (which maps identical streams to themselves). The
//! random `fn` breaks the symmetry between the streams. HC: `W = 0`, `s_α = s_β = 0.01`,
//! `static_α = [e_{s mod n} | I]` for sublayer `s` (attention of layer i is `s = 2i`, its FFN
//! `2i+1`), `static_β = 1`.

use crate::config::Residual;
use crate::kernels::matmul::{linear_backward, linear_forward};
use rayon::prelude::*;

/// Tokens per parallel task; fixed so that reductions never depend on the thread count.
const TOK_CHUNK: usize = 16;

/// Which coefficient map, and the stream shape.
#[derive(Clone, Copy, Debug)]
pub struct HcDims {
    pub kind: Residual,
    /// Streams `n`.
    pub n: usize,
    /// Channels `d` of one stream.
    pub d: usize,
    pub iters: usize,
    /// The mHC ε (pre, softmax, Sinkhorn denominators).
    pub eps: f32,
    /// ε of the RMS statistic.
    pub norm_eps: f32,
}

impl HcDims {
    pub fn from_config(c: &crate::config::ModelConfig) -> Option<HcDims> {
        (c.residual != Residual::Plain).then_some(HcDims {
            kind: c.residual,
            n: c.hc_mult,
            d: c.d_model,
            iters: c.hc_sinkhorn_iters,
            eps: c.hc_eps,
            norm_eps: c.norm_eps,
        })
    }
    fn mhc(&self) -> bool {
        self.kind == Residual::Mhc
    }
    /// Coefficients per GEMM row: `n(n+2)` (mHC, one row per token) or `n+2` (HC, per stream).
    pub fn m(&self) -> usize {
        if self.mhc() {
            self.n * (self.n + 2)
        } else {
            self.n + 2
        }
    }
    /// GEMM rows per token (1 for mHC, n for HC) and GEMM width.
    fn rows_per_token(&self) -> usize {
        if self.mhc() {
            1
        } else {
            self.n
        }
    }
    fn width(&self) -> usize {
        if self.mhc() {
            self.n * self.d
        } else {
            self.d
        }
    }
    /// Length of the `scale` tensor.
    pub fn n_scale(&self) -> usize {
        if self.mhc() {
            3
        } else {
            2
        }
    }
    /// Tensors of one hyper-connection layer: (suffix, shape, weight decay).
    pub fn layer_tensors(&self) -> Vec<(&'static str, Vec<usize>, bool)> {
        let n = self.n;
        if self.mhc() {
            vec![
                ("fn", vec![self.m(), n * self.d], true),
                ("scale", vec![3], false),
                ("base", vec![self.m()], false),
            ]
        } else {
            vec![
                ("fn", vec![n + 2, self.d], true),
                ("scale", vec![2], false),
                ("static_alpha", vec![n, n + 1], false),
                ("static_beta", vec![n], false),
            ]
        }
    }
}

/// Offsets of one hyper-connection layer's tensors in the flat parameter buffer. `stat` is
/// `base [m]` for mHC and `[static_α | static_β]` (`n(n+1) + n` values, adjacent) for HC.
#[derive(Clone, Copy, Debug)]
pub struct HcOffsets {
    pub fn_: usize,
    pub scale: usize,
    pub stat: usize,
    /// llama.cpp's numerics (a GGUF mix that quantises `fn`): the coefficient product's input
    /// rounded as ggml converts it (`kernels::act_quant`); `None`: exact f32.
    pub in_quant: Option<crate::kernels::act_quant::ActQuant>,
}

/// Offsets of the mHC head (`fn [n, nd]`, `scale [1]`, `base [n]`).
pub type HeadOffsets = HcOffsets;

/// What one hyper-connection layer keeps for the backward pass.
#[derive(Default, Clone)]
pub struct HcActs {
    /// `x · fnᵀ` before the RMS scaling: `[T·rows, m]`.
    pub raw: Vec<f32>,
    /// RMS scale per GEMM row: `[T]` (mHC) or `[T, n]` (HC).
    pub rstd: Vec<f32>,
    /// mHC: the logits `mix [T, m]`; HC: the tanh values `a [T, n, n+2]`.
    pub act: Vec<f32>,
    pub pre: Vec<f32>,
    pub post: Vec<f32>,
    /// `[T, n, n]`, `comb[j, k]` = weight of stream j in new stream k (`H^res = combᵀ`).
    pub comb: Vec<f32>,
    /// Read-out `Σ_j pre[j]·x[j]`: `[T, d]` (the input of the block norm).
    pub y: Vec<f32>,
    /// The sublayer output `F(…)`: `[T, d]`.
    pub out: Vec<f32>,
}

impl HcActs {
    /// Buffers for `tokens` tokens (`head`: the mHC collapse, pre only).
    pub fn new(dm: &HcDims, tokens: usize, head: bool) -> Self {
        let (n, d) = (dm.n, dm.d);
        let m = if head { n } else { dm.m() };
        let rows = tokens * dm.rows_per_token();
        HcActs {
            raw: vec![0.0; rows * m],
            rstd: vec![0.0; rows],
            act: vec![0.0; rows * m],
            pre: vec![0.0; tokens * n],
            post: if head { vec![] } else { vec![0.0; tokens * n] },
            comb: if head {
                vec![]
            } else {
                vec![0.0; tokens * n * n]
            },
            y: vec![0.0; tokens * d],
            out: if head { vec![] } else { vec![0.0; tokens * d] },
        }
    }
    fn tokens(&self, n: usize) -> usize {
        self.pre.len() / n
    }
}

/// Dot product with 8 independent accumulators: vectorises (an iterator sum of f32 does not,
/// since it must keep the sequential rounding order) and stays deterministic.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

// ---------------------------------------------------------------------------------------------
// Sinkhorn-Knopp (one token, n×n, row-major comb space)
// ---------------------------------------------------------------------------------------------

/// Number of normalisation steps after the softmax: one column step, then (row, column) pairs.
fn sinkhorn_steps(iters: usize) -> usize {
    2 * iters - 1
}

/// Step `s` normalises columns when even, rows when odd.
fn step_is_col(s: usize) -> bool {
    s.is_multiple_of(2)
}

fn normalize(p: &mut [f32], n: usize, col: bool, eps: f32) {
    match n {
        2 => normalize_fixed::<2>(p, col, eps),
        3 => normalize_fixed::<3>(p, col, eps),
        4 => normalize_fixed::<4>(p, col, eps),
        _ => normalize_any(p, n, col, eps),
    }
}

/// [`normalize_any`] for a stream count known at compile time (unrolled, the sums of all rows
/// or columns side by side): the same operations in the same order per row or column, so
/// the same bits (each row's or column's scaling reads only its own entries).
#[inline(always)]
fn normalize_fixed<const N: usize>(p: &mut [f32], col: bool, eps: f32) {
    let p = &mut p[..N * N];
    let mut s = [0.0f32; N];
    if col {
        for b in 0..N {
            for a in 0..N {
                s[a] += p[b * N + a];
            }
        }
        let inv = s.map(|s| 1.0 / (s + eps));
        for b in 0..N {
            for a in 0..N {
                p[b * N + a] *= inv[a];
            }
        }
    } else {
        for a in 0..N {
            for b in 0..N {
                s[a] += p[a * N + b];
            }
        }
        let inv = s.map(|s| 1.0 / (s + eps));
        for a in 0..N {
            for b in 0..N {
                p[a * N + b] *= inv[a];
            }
        }
    }
}

/// One Sinkhorn normalisation step of an `n × n` matrix: every column (`col`) or row divided
/// by its sum plus `eps`.
fn normalize_any(p: &mut [f32], n: usize, col: bool, eps: f32) {
    for a in 0..n {
        let mut s = 0.0f32;
        for b in 0..n {
            s += if col { p[b * n + a] } else { p[a * n + b] };
        }
        let inv = 1.0 / (s + eps);
        for b in 0..n {
            let i = if col { b * n + a } else { a * n + b };
            p[i] *= inv;
        }
    }
}

fn softmax_rows_eps(p: &mut [f32], logits: &[f32], n: usize, eps: f32) {
    for j in 0..n {
        let row = &logits[j * n..(j + 1) * n];
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut z = 0.0f32;
        for k in 0..n {
            let e = (row[k] - mx).exp();
            p[j * n + k] = e;
            z += e;
        }
        for k in 0..n {
            p[j * n + k] = p[j * n + k] / z + eps;
        }
    }
}

/// `comb = Sinkhorn(logits)` for one token (`logits, comb: [n, n]`).
pub fn sinkhorn_forward(comb: &mut [f32], logits: &[f32], n: usize, iters: usize, eps: f32) {
    softmax_rows_eps(comb, logits, n, eps);
    for s in 0..sinkhorn_steps(iters) {
        normalize(comb, n, step_is_col(s), eps);
    }
}

/// `dlogits = (∂comb/∂logits)ᵀ · g` for one token, replaying the forward through `scratch`
/// (resized to hold the `2·iters` intermediate matrices).
pub fn sinkhorn_backward(
    dlogits: &mut [f32],
    g: &[f32],
    logits: &[f32],
    n: usize,
    iters: usize,
    eps: f32,
    scratch: &mut Vec<f32>,
) {
    let nn = n * n;
    let steps = sinkhorn_steps(iters);
    scratch.resize((steps + 1) * nn + nn, 0.0);
    let (states, gbuf) = scratch.split_at_mut((steps + 1) * nn);
    softmax_rows_eps(&mut states[..nn], logits, n, eps);
    for s in 0..steps {
        let (done, next) = states.split_at_mut((s + 1) * nn);
        next[..nn].copy_from_slice(&done[s * nn..]);
        normalize(&mut next[..nn], n, step_is_col(s), eps);
    }
    gbuf.copy_from_slice(g);
    for s in (0..steps).rev() {
        let x = &states[s * nn..(s + 1) * nn];
        let y = &states[(s + 1) * nn..(s + 2) * nn];
        let col = step_is_col(s);
        match n {
            2 => normalize_backward_fixed::<2>(gbuf, x, y, col, eps),
            3 => normalize_backward_fixed::<3>(gbuf, x, y, col, eps),
            4 => normalize_backward_fixed::<4>(gbuf, x, y, col, eps),
            _ => normalize_backward_any(gbuf, x, y, n, col, eps),
        }
    }
    // Softmax (the +ε passes the gradient): p = states[0] − ε.
    let p0 = &states[..nn];
    for j in 0..n {
        let mut dot = 0.0f32;
        for k in 0..n {
            dot += gbuf[j * n + k] * (p0[j * n + k] - eps);
        }
        for k in 0..n {
            dlogits[j * n + k] = (p0[j * n + k] - eps) * (gbuf[j * n + k] - dot);
        }
    }
}

/// Backward of one normalisation step `y = normalize(x)` on the gradient `g` (in place):
/// per row or column, `g ← (g − Σ g·y) / (Σ x + eps)`.
fn normalize_backward_any(g: &mut [f32], x: &[f32], y: &[f32], n: usize, col: bool, eps: f32) {
    for a in 0..n {
        let (mut sum, mut c) = (0.0f32, 0.0f32);
        for b in 0..n {
            let i = if col { b * n + a } else { a * n + b };
            sum += x[i];
            c += g[i] * y[i];
        }
        let inv = 1.0 / (sum + eps);
        for b in 0..n {
            let i = if col { b * n + a } else { a * n + b };
            g[i] = (g[i] - c) * inv;
        }
    }
}

/// [`normalize_backward_any`] unrolled for a stream count known at compile time: the same
/// operations in the same order per row or column (each reads and writes only its own), so
/// the same bits.
#[inline(always)]
fn normalize_backward_fixed<const N: usize>(
    g: &mut [f32],
    x: &[f32],
    y: &[f32],
    col: bool,
    eps: f32,
) {
    let (g, x, y) = (&mut g[..N * N], &x[..N * N], &y[..N * N]);
    let (mut sum, mut c) = ([0.0f32; N], [0.0f32; N]);
    // Entry (a, b) of the row or column a.
    let at = |a: usize, b: usize| if col { b * N + a } else { a * N + b };
    for b in 0..N {
        for a in 0..N {
            sum[a] += x[at(a, b)];
            c[a] += g[at(a, b)] * y[at(a, b)];
        }
    }
    let inv = sum.map(|s| 1.0 / (s + eps));
    for b in 0..N {
        for a in 0..N {
            let i = at(a, b);
            g[i] = (g[i] - c[a]) * inv[a];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Expansion, read-out, merge, collapse
// ---------------------------------------------------------------------------------------------

/// `x[t, k] = h[t]` for every stream, and the per-stream sums of squares.
pub fn expand(x: &mut [f32], ssq: &mut [f32], h: &[f32], n: usize, d: usize) {
    x.par_chunks_mut(n * d)
        .zip(ssq.par_chunks_mut(n))
        .zip(h.par_chunks(d))
        .for_each(|((x, ssq), h)| {
            let s = dot(h, h);
            for k in 0..n {
                x[k * d..(k + 1) * d].copy_from_slice(h);
                ssq[k] = s;
            }
        });
}

/// `x[t, k] += y[t, k]` for every stream (an Engram module's output), refreshing the per-stream
/// sums of squares `ssq[t, k]`. Its backward is the identity.
pub fn add_streams(x: &mut [f32], ssq: &mut [f32], y: &[f32], n: usize, d: usize) {
    x.par_chunks_mut(n * d)
        .zip(ssq.par_chunks_mut(n))
        .zip(y.par_chunks(n * d))
        .for_each(|((x, ssq), y)| {
            for (a, b) in x.iter_mut().zip(y) {
                *a += b;
            }
            for k in 0..n {
                let row = &x[k * d..(k + 1) * d];
                ssq[k] = dot(row, row);
            }
        });
}

/// Backward of [`expand`]: `dh[t] = Σ_k dx[t, k]`.
pub fn expand_backward(dh: &mut [f32], dx: &[f32], n: usize, d: usize) {
    dh.par_chunks_mut(d)
        .zip(dx.par_chunks(n * d))
        .for_each(|(dh, dx)| {
            dh.copy_from_slice(&dx[..d]);
            for k in 1..n {
                for (a, b) in dh.iter_mut().zip(&dx[k * d..(k + 1) * d]) {
                    *a += b;
                }
            }
        });
}

/// Read-out `y[t] = Σ_j w[t, j] · x[t, j]` (H_pre, the mHC head, or all-ones for the HC
/// collapse when `w` is empty).
pub fn readout(y: &mut [f32], x: &[f32], w: &[f32], n: usize, d: usize) {
    y.par_chunks_mut(d)
        .zip(x.par_chunks(n * d))
        .enumerate()
        .for_each(|(t, (y, x))| {
            let wt = |j: usize| if w.is_empty() { 1.0 } else { w[t * n + j] };
            let w0 = wt(0);
            for (y, &x) in y.iter_mut().zip(&x[..d]) {
                *y = w0 * x;
            }
            for j in 1..n {
                let wj = wt(j);
                for (y, &x) in y.iter_mut().zip(&x[j * d..(j + 1) * d]) {
                    *y += wj * x;
                }
            }
        });
}

/// The fused merge: `xn[t, k] = Σ_j comb[t, j, k] · x[t, j] + post[t, k] · out[t]`, and the
/// sums of squares `ssq[t, k]` of the new streams (the next layer's RMS statistic).
#[allow(clippy::too_many_arguments)]
pub fn merge(
    xn: &mut [f32],
    ssq: &mut [f32],
    x: &[f32],
    out: &[f32],
    post: &[f32],
    comb: &[f32],
    n: usize,
    d: usize,
) {
    xn.par_chunks_mut(n * d)
        .zip(ssq.par_chunks_mut(n))
        .zip(x.par_chunks(n * d))
        .zip(out.par_chunks(d))
        .enumerate()
        .for_each(|(t, (((xn, ssq), x), out))| {
            let post = &post[t * n..(t + 1) * n];
            let comb = &comb[t * n * n..(t + 1) * n * n];
            for k in 0..n {
                let row = &mut xn[k * d..(k + 1) * d];
                let pk = post[k];
                for (r, &o) in row.iter_mut().zip(out) {
                    *r = pk * o;
                }
                for j in 0..n {
                    let c = comb[j * n + k];
                    for (r, &v) in row.iter_mut().zip(&x[j * d..(j + 1) * d]) {
                        *r += c * v;
                    }
                }
                ssq[k] = dot(row, row);
            }
        });
}

/// Backward of [`merge`] given `g = dL/dxn`: writes `dout`, `dx = comb · g` (overwriting), and
/// `dcoef[t] = [d post (n) | d comb (n²)]`.
#[allow(clippy::too_many_arguments)]
pub fn merge_backward(
    dout: &mut [f32],
    dx: &mut [f32],
    dcoef: &mut [f32],
    g: &[f32],
    x: &[f32],
    out: &[f32],
    post: &[f32],
    comb: &[f32],
    n: usize,
    d: usize,
) {
    let nc = n + n * n;
    dout.par_chunks_mut(d)
        .zip(dx.par_chunks_mut(n * d))
        .zip(dcoef.par_chunks_mut(nc))
        .enumerate()
        .for_each(|(t, ((dout, dx), dc))| {
            let g = &g[t * n * d..(t + 1) * n * d];
            let x = &x[t * n * d..(t + 1) * n * d];
            let out = &out[t * d..(t + 1) * d];
            let post = &post[t * n..(t + 1) * n];
            let comb = &comb[t * n * n..(t + 1) * n * n];
            dout.fill(0.0);
            for k in 0..n {
                let gk = &g[k * d..(k + 1) * d];
                let pk = post[k];
                for (o, &gv) in dout.iter_mut().zip(gk) {
                    *o += pk * gv;
                }
                dc[k] = dot(gk, out);
                for j in 0..n {
                    dc[n + j * n + k] = dot(gk, &x[j * d..(j + 1) * d]);
                }
            }
            for j in 0..n {
                let row = &mut dx[j * d..(j + 1) * d];
                row.fill(0.0);
                for k in 0..n {
                    let c = comb[j * n + k];
                    for (r, &gv) in row.iter_mut().zip(&g[k * d..(k + 1) * d]) {
                        *r += c * gv;
                    }
                }
            }
        });
}

// ---------------------------------------------------------------------------------------------
// Coefficients
// ---------------------------------------------------------------------------------------------

/// ggml's `rms_norm` factor of one row: `1/sqrtf(mean + eps)`, the squares (f32) summed in
/// f64 in order, the mean rounded to f32 (`ggml_compute_forward_rms_norm_f32`).
fn ggml_rms_scale(row: &[f32], eps: f32) -> f32 {
    let sum: f64 = row.iter().map(|&t| (t * t) as f64).sum();
    let mean = (sum / row.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// Compute one layer's coefficients (`head`: the mHC collapse weights, into `acts.pre`) from
/// the streams `x` and their sums of squares.
pub fn coeffs_forward(
    dm: &HcDims,
    params: &[f32],
    o: HcOffsets,
    x: &[f32],
    ssq: &[f32],
    acts: &mut HcActs,
    head: bool,
) {
    let (n, d) = (dm.n, dm.d);
    let m = if head { n } else { dm.m() };
    let width = dm.width();
    let tokens = acts.tokens(n);
    let rows = tokens * dm.rows_per_token();
    // llama.cpp's numerics (a quantised `fn`): ggml normalises the streams first
    // (`ggml_rms_norm`) and rounds `x·r` for the product, not `x`; the rounding is
    // scale-invariant only up to float rounding, and embeddings on a 4-bit grid put many
    // values exactly on a Q8_K half-step, where that rounding decides.
    let prenorm = o.in_quant.is_some() && dm.mhc();
    let xq = if prenorm {
        let mut v = x.to_vec();
        for row in v.chunks_exact_mut(width) {
            let r = ggml_rms_scale(row, dm.norm_eps);
            row.iter_mut().for_each(|t| *t *= r);
        }
        v.chunks_exact_mut(width)
            .for_each(|row| o.in_quant.iter().for_each(|q| q.round_trip(row)));
        std::borrow::Cow::Owned(v)
    } else {
        crate::kernels::act_quant::rounded_rows(o.in_quant, x, width)
    };
    let x = &xq[..];
    linear_forward(
        &mut acts.raw,
        x,
        &params[o.fn_..o.fn_ + m * width],
        rows,
        width,
        m,
        false,
    );
    let scale = &params[o.scale..o.scale + if head { 1 } else { dm.n_scale() }];
    let stat = &params[o.stat..o.stat + if head { n } else { n * (n + 2) }];
    let rpt = dm.rows_per_token();
    let HcActs {
        raw,
        rstd,
        act,
        pre,
        post,
        comb,
        ..
    } = acts;
    let (post_it, comb_it): (Vec<&mut [f32]>, Vec<&mut [f32]>) = if head {
        (
            (0..tokens).map(|_| Default::default()).collect(),
            (0..tokens).map(|_| Default::default()).collect(),
        )
    } else {
        (
            post.chunks_mut(n).collect(),
            comb.chunks_mut(n * n).collect(),
        )
    };
    raw.par_chunks(rpt * m)
        .zip(rstd.par_chunks_mut(rpt))
        .zip(act.par_chunks_mut(rpt * m))
        .zip(pre.par_chunks_mut(n))
        .zip(post_it.into_par_iter())
        .zip(comb_it.into_par_iter())
        .zip(ssq.par_chunks(n))
        .for_each(|((((((raw, rstd), act), pre), post), comb), ssq)| {
            if dm.mhc() {
                let s: f32 = ssq.iter().sum();
                let r = 1.0 / (s / (n * d) as f32 + dm.norm_eps).sqrt();
                rstd[0] = r;
                // `raw` is already normalised where `prenorm`.
                let rr = if prenorm { 1.0 } else { r };
                for i in 0..m {
                    let g = (if head { 0 } else { i / n }).min(2);
                    act[i] = raw[i] * rr * scale[g] + stat[i];
                }
                for j in 0..n {
                    pre[j] = sigmoid(act[j]) + dm.eps;
                }
                if !head {
                    for j in 0..n {
                        post[j] = 2.0 * sigmoid(act[n + j]);
                    }
                    sinkhorn_forward(comb, &act[2 * n..], n, dm.iters, dm.eps);
                }
            } else {
                let w = n + 2;
                for j in 0..n {
                    let r = 1.0 / (ssq[j] / d as f32 + dm.norm_eps).sqrt();
                    rstd[j] = r;
                    for c in 0..w {
                        act[j * w + c] = (raw[j * w + c] * r).tanh();
                    }
                    let a = &act[j * w..(j + 1) * w];
                    let sa = &stat[j * (n + 1)..(j + 1) * (n + 1)];
                    pre[j] = sa[0] + scale[0] * a[0];
                    for k in 0..n {
                        comb[j * n + k] = sa[1 + k] + scale[0] * a[1 + k];
                    }
                    post[j] = stat[n * (n + 1) + j] + scale[1] * a[n + 1];
                }
            }
        });
}

/// Backward of the read-out and of the coefficients of one layer.
///
/// Inputs: `dy = dL/dy` (`[T, d]`, the read-out gradient), `dcoef = [d post | d comb]` per token
/// from [`merge_backward`] (ignored for the head). Adds into `dx` (`[T, n, d]`) the read-out
/// term, the RMS-statistic term and `d raw · fn`, and into `grads` the gradients of `fn`,
/// `scale` and the static block. `draw` is scratch (`[T·rows, m]`).
#[allow(clippy::too_many_arguments)]
pub fn coeffs_backward(
    dm: &HcDims,
    params: &[f32],
    grads: &mut [f32],
    o: HcOffsets,
    x: &[f32],
    acts: &HcActs,
    dy: &[f32],
    dcoef: &[f32],
    dx: &mut [f32],
    draw: &mut Vec<f32>,
    head: bool,
) {
    let (n, d) = (dm.n, dm.d);
    let m = if head { n } else { dm.m() };
    let width = dm.width();
    let tokens = acts.tokens(n);
    let rpt = dm.rows_per_token();
    let rows = tokens * rpt;
    let n_scale = if head { 1 } else { dm.n_scale() };
    let nstat = if head { n } else { n * (n + 2) };
    draw.resize(rows * m, 0.0);
    let scale = &params[o.scale..o.scale + n_scale];
    let nc = n + n * n;
    // Per chunk of tokens: partial sums of d scale and d stat (reduced in a fixed order).
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(TOK_CHUNK * n * d)
        .zip(draw.par_chunks_mut(TOK_CHUNK * rpt * m))
        .enumerate()
        .map(|(ci, (dx, draw))| {
            let mut part = vec![0.0f32; n_scale + nstat];
            let (dscale, dstat) = part.split_at_mut(n_scale);
            let mut scratch = Vec::new();
            let mut dpre = vec![0.0f32; n];
            let mut dmix = vec![0.0f32; m];
            let t0 = ci * TOK_CHUNK;
            for (ti, (dx, draw)) in dx
                .chunks_mut(n * d)
                .zip(draw.chunks_mut(rpt * m))
                .enumerate()
            {
                let t = t0 + ti;
                let xt = &x[t * n * d..(t + 1) * n * d];
                let dyt = &dy[t * d..(t + 1) * d];
                let pre = &acts.pre[t * n..(t + 1) * n];
                // Read-out: y = Σ pre[j] x[j].
                for j in 0..n {
                    let xj = &xt[j * d..(j + 1) * d];
                    dpre[j] = dot(xj, dyt);
                    let pj = pre[j];
                    for (g, &v) in dx[j * d..(j + 1) * d].iter_mut().zip(dyt) {
                        *g += pj * v;
                    }
                }
                let dc = if head {
                    &[][..]
                } else {
                    &dcoef[t * nc..(t + 1) * nc]
                };
                let raw = &acts.raw[t * rpt * m..(t + 1) * rpt * m];
                let act = &acts.act[t * rpt * m..(t + 1) * rpt * m];
                if dm.mhc() {
                    for j in 0..n {
                        let s = sigmoid(act[j]);
                        dmix[j] = dpre[j] * s * (1.0 - s);
                    }
                    if !head {
                        for j in 0..n {
                            let s = sigmoid(act[n + j]);
                            dmix[n + j] = dc[j] * 2.0 * s * (1.0 - s);
                        }
                        sinkhorn_backward(
                            &mut dmix[2 * n..],
                            &dc[n..],
                            &act[2 * n..],
                            n,
                            dm.iters,
                            dm.eps,
                            &mut scratch,
                        );
                    }
                    let r = acts.rstd[t];
                    let mut dr = 0.0f32;
                    for i in 0..m {
                        let g = (if head { 0 } else { i / n }).min(2);
                        dstat[i] += dmix[i];
                        dscale[g] += dmix[i] * raw[i] * r;
                        draw[i] = dmix[i] * r * scale[g];
                        dr += dmix[i] * raw[i] * scale[g];
                    }
                    // r = (Σx²/(nd) + ε)^(-1/2):  ∂r/∂x = −r³ x / (nd).
                    let k = -dr * r * r * r / (n * d) as f32;
                    for (g, &v) in dx.iter_mut().zip(xt) {
                        *g += k * v;
                    }
                } else {
                    let w = n + 2;
                    for j in 0..n {
                        let a = &act[j * w..(j + 1) * w];
                        let rw = &raw[j * w..(j + 1) * w];
                        let r = acts.rstd[t * n + j];
                        // d of α[j, c] (c ≤ n) and β[j].
                        let dalpha = |c: usize| {
                            if c == 0 {
                                dpre[j]
                            } else if c <= n {
                                dc[n + j * n + (c - 1)]
                            } else {
                                dc[j]
                            }
                        };
                        let mut dr = 0.0f32;
                        for c in 0..w {
                            let da = dalpha(c);
                            let (si, stat_i) = if c <= n {
                                (0, j * (n + 1) + c)
                            } else {
                                (1, n * (n + 1) + j)
                            };
                            dstat[stat_i] += da;
                            dscale[si] += da * a[c];
                            let dz = da * scale[si] * (1.0 - a[c] * a[c]);
                            draw[j * w + c] = dz * r;
                            dr += dz * rw[c];
                        }
                        let k = -dr * r * r * r / d as f32;
                        for (g, &v) in dx[j * d..(j + 1) * d]
                            .iter_mut()
                            .zip(&xt[j * d..(j + 1) * d])
                        {
                            *g += k * v;
                        }
                    }
                }
            }
            part
        })
        .collect();
    for p in &partials {
        for (g, v) in grads[o.scale..o.scale + n_scale]
            .iter_mut()
            .zip(&p[..n_scale])
        {
            *g += v;
        }
        for (g, v) in grads[o.stat..o.stat + nstat].iter_mut().zip(&p[n_scale..]) {
            *g += v;
        }
    }
    linear_backward(
        Some((dx, true)),
        &mut grads[o.fn_..o.fn_ + m * width],
        draw,
        x,
        &params[o.fn_..o.fn_ + m * width],
        rows,
        width,
        m,
    );
}

/// Initial values of one layer's tensors (module docs): `sublayer` is 2i (attention of layer
/// i) or 2i+1 (its FFN); `normal` fills a slice with N(0, init_std²).
pub fn init_layer(
    dm: &HcDims,
    params: &mut [f32],
    o: HcOffsets,
    sublayer: usize,
    head: bool,
    normal: &mut dyn FnMut(&mut [f32]),
) {
    let n = dm.n;
    let m = if head { n } else { dm.m() };
    let fnr = &mut params[o.fn_..o.fn_ + m * dm.width()];
    let n_scale = if head { 1 } else { dm.n_scale() };
    let nstat = if head { n } else { n * (n + 2) };
    if dm.mhc() {
        normal(fnr);
        params[o.scale..o.scale + n_scale].fill(0.01);
        params[o.stat..o.stat + nstat].fill(0.0);
    } else {
        fnr.fill(0.0);
        params[o.scale..o.scale + n_scale].fill(0.01);
        let st = &mut params[o.stat..o.stat + nstat];
        st.fill(0.0);
        for j in 0..n {
            st[j * (n + 1)] = if j == sublayer % n { 1.0 } else { 0.0 };
            st[j * (n + 1) + 1 + j] = 1.0;
            st[n * (n + 1) + j] = 1.0;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Diagnostics
// ---------------------------------------------------------------------------------------------

/// Amax gain magnitudes of the composite residual mapping `∏ H^res` (paper §6 / Fig. 3, 7):
/// for every hyper-connection layer s (attention and FFN counted separately) the composite
/// `P_s = H_s ⋯ H_1` (with `H = combᵀ`), its forward gain (max absolute row sum) and backward
/// gain (max absolute column sum), each averaged over `tokens` (the first sequence). Also the
/// single-layer gains. Returns `[(fwd, bwd, fwd_single, bwd_single)]` per layer.
pub fn amax_gains(layers: &[&[f32]], n: usize, tokens: usize) -> Vec<[f64; 4]> {
    let mut sums = vec![[0.0f64; 4]; layers.len()];
    let mut p = vec![0.0f64; n * n];
    let mut q = vec![0.0f64; n * n];
    let gains = |m: &[f64]| {
        let (mut rmax, mut cmax) = (0.0f64, 0.0f64);
        for a in 0..n {
            let (mut r, mut c) = (0.0, 0.0);
            for b in 0..n {
                r += m[a * n + b].abs();
                c += m[b * n + a].abs();
            }
            rmax = rmax.max(r);
            cmax = cmax.max(c);
        }
        (rmax, cmax)
    };
    for t in 0..tokens {
        p.fill(0.0);
        for a in 0..n {
            p[a * n + a] = 1.0;
        }
        for (s, comb) in layers.iter().enumerate() {
            let c = &comb[t * n * n..(t + 1) * n * n];
            // H[k][j] = comb[j][k];  q = H · p.
            let h: Vec<f64> = (0..n * n).map(|i| c[(i % n) * n + i / n] as f64).collect();
            for k in 0..n {
                for b in 0..n {
                    q[k * n + b] = (0..n).map(|j| h[k * n + j] * p[j * n + b]).sum();
                }
            }
            std::mem::swap(&mut p, &mut q);
            let (f, bw) = gains(&p);
            let (f1, b1) = gains(&h);
            sums[s][0] += f;
            sums[s][1] += bw;
            sums[s][2] += f1;
            sums[s][3] += b1;
        }
    }
    for s in &mut sums {
        for v in s.iter_mut() {
            *v /= tokens.max(1) as f64;
        }
    }
    sums
}

#[cfg(test)]
#[path = "mhc_tests.rs"]
mod tests;
