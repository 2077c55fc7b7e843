//! Context-aware gating and the short convolution (spec §1.4–1.5, paper eq. 3–5).
//!
//! Inputs: the retrieved memory `e: [N, d_mem]` and the residual streams `h: [N, n, d]`
//! (`n = 1` for a plain residual stream, `n = hc_mult` with mHC; branch `m` uses stream `m` as
//! its query and the same memory). Output `y: [N, n, d]`, added to stream `m` by the caller.
//!
//! ```text
//! [v | kr_0 … kr_{n-1}] = e · W_kvᵀ + b_kv           W_kv: [(n+1)·d, d_mem]  (W_V; W_K^(m))
//! k_m = RMSNorm(kr_m; wk[m], ε_g)     q_m = RMSNorm(h_m; wq[m], ε_g)       ε_g = f32::EPSILON
//! s_m = k_m·q_m / √d     ŝ_m = sign(s_m)·√max(|s_m|, 1e-6)     a_m = σ(ŝ_m)
//! u_m = a_m · v                                              (value, [N, n, d])
//! z_m = RMSNorm(u_m; wc[m], ε_c = 1e-5)                      (conv branch only)
//! c[t, ch] = Σ_j w[ch, j] · z[t − (K−1−j)·dil, ch]   over taps inside the same document
//! y = u + SiLU(c)        (or y = u without the convolution, as in V4.1)
//! ```
//!
//! Channels of the depthwise convolution are branch-major (`ch = m·d + i`), as in the demo's
//! `Conv1d(hc·d, groups = hc·d)`; its weight `[n·d, K]` is PyTorch's `[C, 1, K]`, so the last tap
//! multiplies the current step. `dil` is the largest N-gram order. A tap reaching before the
//! document start (`(K−1−j)·dil > pos[t]`) is zero, which equals the demo's left zero padding
//! for unpacked rows.
//!
//! Backward, with `ŷ` the upstream gradient of `y`:
//! `dc = ŷ·SiLU'(c)`, `dz[t'] = Σ_j w[·, j]·dc[t' + off_j]`, `dw[·, j] = Σ_t dc[t]·z[t − off_j]`,
//! `du = ŷ + RMSNorm'(dz)`, `da_m = du_m·v`, `dv = Σ_m a_m·du_m`,
//! `ds = da·a(1−a)·½|s|^{-½}` (0 where `|s| ≤ 1e-6`), `dk = ds·q/√d`, `dq = ds·k/√d`, then the
//! RMSNorm backward of both sides and one GEMM pair for `W_kv`. Gradients w.r.t. the streams are
//! only the query path: the caller's residual `h += y` passes `ŷ` to `h` itself.

use crate::kernels::matmul::{gemm, MatRef};
use rayon::prelude::*;

/// Tokens per parallel task; fixed so that weight-gradient reductions never depend on threads.
const TOK_PER_TASK: usize = 16;

/// Shapes and constants of one Engram gate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GateSpec {
    /// Model width `d`.
    pub d: usize,
    /// Memory width `d_mem = (N−1)·K·D_h`.
    pub d_mem: usize,
    /// Residual streams / mHC branches `n` (1 without mHC).
    pub n_branch: usize,
    /// Convolution kernel size `K`; 0 disables the convolution.
    pub kernel: usize,
    /// Convolution dilation (the largest N-gram order).
    pub dilation: usize,
    /// RMSNorm ε of the key/query norms (the demo's `nn.RMSNorm(eps=None)` = f32 machine ε).
    pub eps_gate: f32,
    /// RMSNorm ε of the per-branch norm before the convolution.
    pub eps_conv: f32,
}

/// Offsets of the gate's tensors inside its flat parameter slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateOffsets {
    /// `[(n+1)·d, d_mem]`: `value_proj.weight` then `key_projs.{m}.weight`.
    pub wkv: usize,
    /// `[(n+1)·d]`: `value_proj.bias` then `key_projs.{m}.bias`.
    pub bkv: usize,
    /// `[n, d]` key norms (`norm1`).
    pub norm_k: usize,
    /// `[n, d]` query norms (`norm2`).
    pub norm_q: usize,
    /// `[n, d]` per-branch norms before the convolution (conv only).
    pub norm_c: usize,
    /// `[n·d, K]` depthwise convolution weight (conv only).
    pub conv: usize,
    pub total: usize,
}

impl GateSpec {
    pub fn has_conv(&self) -> bool {
        self.kernel > 0
    }

    pub fn offsets(&self) -> GateOffsets {
        let (d, n) = (self.d, self.n_branch);
        let wkv = 0;
        let bkv = wkv + (n + 1) * d * self.d_mem;
        let norm_k = bkv + (n + 1) * d;
        let norm_q = norm_k + n * d;
        let norm_c = norm_q + n * d;
        let conv = norm_c + if self.has_conv() { n * d } else { 0 };
        let total = conv + n * d * self.kernel;
        GateOffsets {
            wkv,
            bkv,
            norm_k,
            norm_q,
            norm_c,
            conv,
            total,
        }
    }

    /// Number of gate parameters.
    pub fn n_params(&self) -> usize {
        self.offsets().total
    }

    /// `(name, shape, offset)` of every tensor, in storage order (the demo's module names).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, usize)> {
        let (d, n, o) = (self.d, self.n_branch, self.offsets());
        let mut t = vec![
            ("value_proj.weight".into(), vec![d, self.d_mem], o.wkv),
            ("value_proj.bias".into(), vec![d], o.bkv),
        ];
        for m in 0..n {
            t.push((
                format!("key_projs.{m}.weight"),
                vec![d, self.d_mem],
                o.wkv + (m + 1) * d * self.d_mem,
            ));
            t.push((format!("key_projs.{m}.bias"), vec![d], o.bkv + (m + 1) * d));
        }
        for m in 0..n {
            t.push((format!("norm1.{m}.weight"), vec![d], o.norm_k + m * d));
        }
        for m in 0..n {
            t.push((format!("norm2.{m}.weight"), vec![d], o.norm_q + m * d));
        }
        if self.has_conv() {
            for m in 0..n {
                t.push((
                    format!("short_conv.norms.{m}.weight"),
                    vec![d],
                    o.norm_c + m * d,
                ));
            }
            t.push((
                "short_conv.conv.weight".into(),
                vec![n * d, 1, self.kernel],
                o.conv,
            ));
        }
        t
    }

    /// Initial parameters: projections ~ N(0, std²), biases 0, norm weights 1, convolution 0
    /// (the paper's zero init, so that `y = u` at step 0).
    pub fn init(&self, rng: &mut crate::rng::Rng, std: f32) -> Vec<f32> {
        let o = self.offsets();
        let mut p = vec![0.0f32; o.total];
        rng.fill_normal(&mut p[o.wkv..o.bkv], std);
        let n_norm = if self.has_conv() { 3 } else { 2 };
        p[o.norm_k..o.norm_k + n_norm * self.n_branch * self.d].fill(1.0);
        p
    }

    /// Steps of history the convolution needs at decode time, `(K−1)·dil`.
    pub fn conv_history(&self) -> usize {
        self.kernel.saturating_sub(1) * self.dilation
    }
}

/// Activations of one gate forward pass kept for the backward pass.
#[derive(Default, Clone)]
pub struct GateActs {
    n: usize,
    e: Vec<f32>,
    h: Vec<f32>,
    pos: Vec<u32>,
    /// `[N, (n+1)·d]` projections (bias included).
    kv: Vec<f32>,
    /// `[N, 5, n]`: reciprocal RMS of keys, queries, values; score `s`; gate `a`.
    sc: Vec<f32>,
    /// `[N, 2, n, d]`: gated values `u`, then conv inputs `z`.
    uz: Vec<f32>,
    /// `[N, n, d]` conv outputs `c` (conv only).
    c: Vec<f32>,
}

impl GateActs {
    /// Gate values `a: [N, n]`.
    pub fn gates(&self) -> Vec<f32> {
        let n = self.sc.len() / (5 * self.n.max(1));
        self.sc
            .chunks(5 * n)
            .flat_map(|c| c[4 * n..].to_vec())
            .collect()
    }
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
fn rstd(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|&v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// `sign(s)·√max(|s|, 1e-6)` with `sign(0) = 0` (as `torch.sign`).
#[inline]
fn signed_sqrt(s: f32) -> f32 {
    let r = s.abs().max(1e-6).sqrt();
    if s > 0.0 {
        r
    } else if s < 0.0 {
        -r
    } else {
        0.0
    }
}

/// RMSNorm backward of one row: writes (or adds) `dx`, accumulates `dw`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn rms_row_backward(
    dx: &mut [f32],
    add: bool,
    dw: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    r: f32,
) {
    let d = x.len();
    let mut dot = 0.0f32;
    for i in 0..d {
        let xh = x[i] * r;
        dw[i] += dy[i] * xh;
        dot += dy[i] * w[i] * xh;
    }
    let mean = dot / d as f32;
    for i in 0..d {
        let v = r * (dy[i] * w[i] - x[i] * r * mean);
        if add {
            dx[i] += v;
        } else {
            dx[i] = v;
        }
    }
}

/// Per-token part of the forward pass after the projections: gates, values and (with the
/// convolution) the normalised conv inputs. `sc: [5, n]`, `uz: [2, n, d]`. Shared by the batch
/// and the decode paths.
fn token_forward(
    spec: &GateSpec,
    p: &[f32],
    kv: &[f32],
    h: &[f32],
    sc: &mut [f32],
    uz: &mut [f32],
) {
    let (d, n, o) = (spec.d, spec.n_branch, spec.offsets());
    let v = &kv[..d];
    let scale = 1.0 / (d as f32).sqrt();
    let (u, z) = uz.split_at_mut(n * d);
    for m in 0..n {
        let kr = &kv[(m + 1) * d..(m + 2) * d];
        let hq = &h[m * d..(m + 1) * d];
        let wk = &p[o.norm_k + m * d..o.norm_k + (m + 1) * d];
        let wq = &p[o.norm_q + m * d..o.norm_q + (m + 1) * d];
        let rk = rstd(kr, spec.eps_gate);
        let rq = rstd(hq, spec.eps_gate);
        let mut dot = 0.0f32;
        for i in 0..d {
            dot += (kr[i] * rk * wk[i]) * (hq[i] * rq * wq[i]);
        }
        let s = dot * scale;
        let a = sigmoid(signed_sqrt(s));
        let um = &mut u[m * d..(m + 1) * d];
        for i in 0..d {
            um[i] = a * v[i];
        }
        let mut rz = 0.0;
        if spec.has_conv() {
            let wc = &p[o.norm_c + m * d..o.norm_c + (m + 1) * d];
            rz = rstd(um, spec.eps_conv);
            for i in 0..d {
                z[m * d + i] = um[i] * rz * wc[i];
            }
        }
        sc[m] = rk;
        sc[n + m] = rq;
        sc[2 * n + m] = rz;
        sc[3 * n + m] = s;
        sc[4 * n + m] = a;
    }
}

/// `[N, (n+1)·d] = e · W_kvᵀ + b_kv`.
fn project(spec: &GateSpec, p: &[f32], e: &[f32], n_tok: usize) -> Vec<f32> {
    let (o, w) = (spec.offsets(), (spec.n_branch + 1) * spec.d);
    let mut kv = vec![0.0f32; n_tok * w];
    for row in kv.chunks_mut(w) {
        row.copy_from_slice(&p[o.bkv..o.bkv + w]);
    }
    gemm(
        &mut kv,
        w,
        MatRef::new(e, n_tok, spec.d_mem),
        MatRef::new(&p[o.wkv..o.bkv], w, spec.d_mem).t(),
        1.0,
        true,
        true,
    );
    kv
}

/// Depthwise dilated causal convolution at one step: `c[ch] = Σ_j w[ch, j]·z_{off_j}[ch]`, where
/// `past(off)` gives the conv input `off` steps back, or `None` before the document start.
fn conv_token<'a>(
    spec: &GateSpec,
    w: &[f32],
    past: impl Fn(usize) -> Option<&'a [f32]>,
    c: &mut [f32],
) {
    let k = spec.kernel;
    c.fill(0.0);
    for j in 0..k {
        let off = (k - 1 - j) * spec.dilation;
        if let Some(zp) = past(off) {
            for (ch, cv) in c.iter_mut().enumerate() {
                *cv += w[ch * k + j] * zp[ch];
            }
        }
    }
}

#[inline]
fn silu(c: f32) -> f32 {
    c * sigmoid(c)
}

/// Forward pass over `N = pos.len()` tokens. `e: [N, d_mem]`, `h, y: [N, n, d]`, `pos`: position
/// of each token inside its document (see [`super::hash::positions_in_documents`]).
pub fn forward(
    spec: &GateSpec,
    p: &[f32],
    e: &[f32],
    h: &[f32],
    pos: &[u32],
    y: &mut [f32],
    acts: &mut GateActs,
) {
    let (d, n, nt) = (spec.d, spec.n_branch, pos.len());
    let nd = n * d;
    assert_eq!(p.len(), spec.n_params(), "engram gate: parameter count");
    assert_eq!(e.len(), nt * spec.d_mem, "engram gate: memory shape");
    assert_eq!(h.len(), nt * nd, "engram gate: stream shape");
    assert_eq!(y.len(), nt * nd, "engram gate: output shape");
    assert!(
        pos.iter().enumerate().all(|(t, &q)| q as usize <= t),
        "engram gate: a position reaches before the batch"
    );
    let w = (n + 1) * d;
    let kv = project(spec, p, e, nt);
    let mut sc = vec![0.0f32; nt * 5 * n];
    let mut uz = vec![0.0f32; nt * 2 * nd];
    kv.par_chunks(w)
        .zip(h.par_chunks(nd))
        .zip(sc.par_chunks_mut(5 * n))
        .zip(uz.par_chunks_mut(2 * nd))
        .for_each(|(((kv, h), sc), uz)| token_forward(spec, p, kv, h, sc, uz));
    let mut c = Vec::new();
    if spec.has_conv() {
        let o = spec.offsets();
        c = vec![0.0f32; nt * nd];
        let uz = &uz;
        c.par_chunks_mut(nd)
            .zip(y.par_chunks_mut(nd))
            .enumerate()
            .for_each(|(t, (c, y))| {
                let past = |off: usize| {
                    (off as u32 <= pos[t])
                        .then(|| &uz[(t - off) * 2 * nd + nd..(t - off + 1) * 2 * nd])
                };
                conv_token(spec, &p[o.conv..], past, c);
                let u = &uz[t * 2 * nd..t * 2 * nd + nd];
                for i in 0..nd {
                    y[i] = u[i] + silu(c[i]);
                }
            });
    } else {
        for (y, uz) in y.chunks_mut(nd).zip(uz.chunks(2 * nd)) {
            y.copy_from_slice(&uz[..nd]);
        }
    }
    *acts = GateActs {
        n: nt,
        e: e.to_vec(),
        h: h.to_vec(),
        pos: pos.to_vec(),
        kv,
        sc,
        uz,
        c,
    };
}

/// Backward pass. `dy: [N, n, d]` is the gradient of the output; `dh` (`[N, n, d]`) receives
/// the query-path gradient added to it; `de` (`[N, d_mem]`) is written; `dp` (the gate's
/// parameter gradient) is accumulated.
pub fn backward(
    spec: &GateSpec,
    p: &[f32],
    acts: &GateActs,
    dy: &[f32],
    dh: &mut [f32],
    de: &mut [f32],
    dp: &mut [f32],
) {
    let (d, n, nt) = (spec.d, spec.n_branch, acts.n);
    let nd = n * d;
    let o = spec.offsets();
    let w = (n + 1) * d;
    let k = spec.kernel;
    assert_eq!(dy.len(), nt * nd);
    assert_eq!(dh.len(), nt * nd);
    assert_eq!(de.len(), nt * spec.d_mem);
    assert_eq!(dp.len(), o.total);
    let pos = &acts.pos;
    // dc = dy · SiLU'(c)
    let dc: Vec<f32> = if spec.has_conv() {
        dy.par_iter()
            .zip(acts.c.par_iter())
            .map(|(&g, &c)| {
                let sg = sigmoid(c);
                g * sg * (1.0 + c * (1.0 - sg))
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut dkv = vec![0.0f32; nt * w];
    // Per-task partial weight gradients: [norm_k | norm_q | norm_c (n·d each) | conv (n·d·K)].
    let part_len = 3 * nd + nd * k;
    let scale = 1.0 / (d as f32).sqrt();
    let partials: Vec<Vec<f32>> = dkv
        .par_chunks_mut(w * TOK_PER_TASK)
        .zip(dh.par_chunks_mut(nd * TOK_PER_TASK))
        .enumerate()
        .map(|(task, (dkv, dh))| {
            let mut part = vec![0.0f32; part_len];
            let (pk, rest) = part.split_at_mut(nd);
            let (pq, rest) = rest.split_at_mut(nd);
            let (pc, pconv) = rest.split_at_mut(nd);
            let mut du = vec![0.0f32; nd];
            let mut dz = vec![0.0f32; nd];
            let mut dk = vec![0.0f32; d];
            let mut dq = vec![0.0f32; d];
            for (i, (dkv, dh)) in dkv.chunks_mut(w).zip(dh.chunks_mut(nd)).enumerate() {
                let t = task * TOK_PER_TASK + i;
                let uz = &acts.uz[t * 2 * nd..(t + 1) * 2 * nd];
                let (u, _) = uz.split_at(nd);
                let sc = &acts.sc[t * 5 * n..(t + 1) * 5 * n];
                du.copy_from_slice(&dy[t * nd..(t + 1) * nd]);
                if spec.has_conv() {
                    let wconv = &p[o.conv..];
                    dz.fill(0.0);
                    for j in 0..k {
                        let off = (k - 1 - j) * spec.dilation;
                        let tt = t + off;
                        if tt < nt && off as u32 <= pos[tt] {
                            let g = &dc[tt * nd..(tt + 1) * nd];
                            for ch in 0..nd {
                                dz[ch] += wconv[ch * k + j] * g[ch];
                            }
                        }
                        if off as u32 <= pos[t] {
                            let zp = &acts.uz[(t - off) * 2 * nd + nd..(t - off + 1) * 2 * nd];
                            let g = &dc[t * nd..(t + 1) * nd];
                            for ch in 0..nd {
                                pconv[ch * k + j] += g[ch] * zp[ch];
                            }
                        }
                    }
                    for m in 0..n {
                        let r = m * d..(m + 1) * d;
                        rms_row_backward(
                            &mut du[r.clone()],
                            true,
                            &mut pc[r.clone()],
                            &dz[r.clone()],
                            &u[r.clone()],
                            &p[o.norm_c + m * d..o.norm_c + (m + 1) * d],
                            sc[2 * n + m],
                        );
                    }
                }
                let kv = &acts.kv[t * w..(t + 1) * w];
                let h = &acts.h[t * nd..(t + 1) * nd];
                let v = &kv[..d];
                let (dv, dkr) = dkv.split_at_mut(d);
                dv.fill(0.0);
                for m in 0..n {
                    let (rk, rq, s, a) = (sc[m], sc[n + m], sc[3 * n + m], sc[4 * n + m]);
                    let dum = &du[m * d..(m + 1) * d];
                    let mut da = 0.0f32;
                    for i in 0..d {
                        da += dum[i] * v[i];
                        dv[i] += a * dum[i];
                    }
                    let sa = s.abs();
                    let dsq = if sa > 1e-6 { 0.5 / sa.sqrt() } else { 0.0 };
                    let ds = da * a * (1.0 - a) * dsq * scale;
                    let kr = &kv[(m + 1) * d..(m + 2) * d];
                    let hq = &h[m * d..(m + 1) * d];
                    let wk = &p[o.norm_k + m * d..o.norm_k + (m + 1) * d];
                    let wq = &p[o.norm_q + m * d..o.norm_q + (m + 1) * d];
                    for i in 0..d {
                        dk[i] = ds * hq[i] * rq * wq[i];
                        dq[i] = ds * kr[i] * rk * wk[i];
                    }
                    let r = m * d..(m + 1) * d;
                    rms_row_backward(
                        &mut dkr[r.clone()],
                        false,
                        &mut pk[r.clone()],
                        &dk,
                        kr,
                        wk,
                        rk,
                    );
                    rms_row_backward(
                        &mut dh[r.clone()],
                        true,
                        &mut pq[r.clone()],
                        &dq,
                        hq,
                        wq,
                        rq,
                    );
                }
            }
            part
        })
        .collect();
    for part in &partials {
        let add = |dst: &mut [f32], src: &[f32]| dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
        add(&mut dp[o.norm_k..o.norm_k + nd], &part[..nd]);
        add(&mut dp[o.norm_q..o.norm_q + nd], &part[nd..2 * nd]);
        if spec.has_conv() {
            add(&mut dp[o.norm_c..o.norm_c + nd], &part[2 * nd..3 * nd]);
            add(&mut dp[o.conv..o.conv + nd * k], &part[3 * nd..]);
        }
    }
    // de = dkv · W_kv;  dW_kv += dkvᵀ · e;  db_kv += Σ_t dkv.
    let wkv = &p[o.wkv..o.bkv];
    gemm(
        de,
        spec.d_mem,
        MatRef::new(&dkv, nt, w),
        MatRef::new(wkv, w, spec.d_mem),
        1.0,
        false,
        true,
    );
    gemm(
        &mut dp[o.wkv..o.bkv],
        spec.d_mem,
        MatRef::new(&dkv, nt, w).t(),
        MatRef::new(&acts.e, nt, spec.d_mem),
        1.0,
        true,
        true,
    );
    let db = &mut dp[o.bkv..o.bkv + w];
    for row in dkv.chunks(w) {
        for (a, b) in db.iter_mut().zip(row) {
            *a += b;
        }
    }
}

/// Decode-time state of one gate for one sequence: the conv inputs `z` of the last
/// `(K−1)·dil` steps of the current document, oldest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GateState {
    hist: std::collections::VecDeque<Vec<f32>>,
}

impl GateState {
    /// Forget the history (at a document start).
    pub fn reset(&mut self) {
        self.hist.clear();
    }
}

/// One token of incremental evaluation: `e: [d_mem]`, `h, y: [n, d]`. Gives the outputs of
/// [`forward`] over the whole document, one position at a time.
pub fn forward_step(
    spec: &GateSpec,
    p: &[f32],
    e: &[f32],
    h: &[f32],
    state: &mut GateState,
    y: &mut [f32],
) {
    let nd = spec.n_branch * spec.d;
    assert_eq!(y.len(), nd);
    let kv = project(spec, p, e, 1);
    let mut sc = vec![0.0f32; 5 * spec.n_branch];
    let mut uz = vec![0.0f32; 2 * nd];
    token_forward(spec, p, &kv, h, &mut sc, &mut uz);
    if spec.has_conv() {
        let o = spec.offsets();
        let mut c = vec![0.0f32; nd];
        let hist = &state.hist;
        let z = &uz[nd..];
        let past = |off: usize| {
            if off == 0 {
                Some(z)
            } else {
                (off <= hist.len()).then(|| hist[hist.len() - off].as_slice())
            }
        };
        conv_token(spec, &p[o.conv..], past, &mut c);
        for i in 0..nd {
            y[i] = uz[i] + silu(c[i]);
        }
        state.hist.push_back(z.to_vec());
        while state.hist.len() > spec.conv_history() {
            state.hist.pop_front();
        }
    } else {
        y.copy_from_slice(&uz[..nd]);
    }
}
