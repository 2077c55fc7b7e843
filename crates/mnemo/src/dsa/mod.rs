//! DeepSeek Sparse Attention (DeepSeek-V3.2, spec `dsa.md`): a lightning indexer per layer
//! picks, for every query token, the `k` earlier tokens that the layer's attention reads.
//!
//! ```text
//! a = the layer's attention input (RMSNorm output)                         [n, d]
//! q_I = RoPE_half(a·Wqᵀ)                        (per head, dims 0..r)      [n, H_I, d_I]
//! k_I = RoPE_half(LayerNorm(a·Wkᵀ; γ, β, 1e-6)) (dims 0..r)                [n, d_I]
//! w   = (a·Wprojᵀ) · H_I^-½ · d_I^-½                                       [n, H_I]
//! I(t,s) = Σ_j w(t,j)·ReLU(q_I(t,j)·k_I(s))        s ≤ t, same sequence
//! S_t = top-min(k, t+1) of I(t, ·)   (a set; ties prefer the lower position)
//! o_t = Attn(q_t, {k_s, v_s : s ∈ S_t})   shared by all heads  (kernels::sparse_attention)
//! ```
//!
//! **Training** (spec §5; `train.dsa_stage`; plus a `dense` stage that trains everything with
//! dense attention and the indexer beside it, for runs that start from scratch):
//! - *warmup*: attention stays dense; the target is the head-summed, L1-normalised dense
//!   attention `p_t = (1/H)·Σ_h softmax_h(q_h·k/√d_h)` over `s ≤ t` (recomputed from q, k and
//!   the kernel's lse), and `L_I = mean_{layers, t} KL(p_t ‖ softmax(I_t))`; only the indexer
//!   is updated (everything else frozen).
//! - *sparse*: attention over `S_t`; the model learns from the LM loss; the indexer only from
//!   `KL(p_{t,S} ‖ softmax(I_{t,S}))`, where `p_{t,S} = (1/H)·Σ_h softmax_h` of the sparse
//!   attention itself (each head's softmax over `S_t`, as Megatron applies the top-k mask before
//!   the softmax). Its input `a` is detached: no gradient flows from the indexer into the model.
//!
//! Indexer backward, given `g(t,s) = dL/dI(t,s) = c·(softmax(I_t)(s) − p_t(s))` with
//! `c = 1/(n_layers·n_tokens)` on the pairs the loss covers (`z = q_I(t,j)·k_I(s)`):
//! ```text
//! dw(t,j)   = Σ_s g·ReLU(z)          dq_I(t,j) = Σ_s g·w(t,j)·[z>0]·k_I(s)
//! dk_I(s)   = Σ_{t,j} g·w(t,j)·[z>0]·q_I(t,j)
//! then inverse RoPE, LayerNorm backward (γ, β), and dW = dYᵀ·a for the three projections
//! ```
//! dk is summed per key row over the inverted pair list, so every reduction has a fixed
//! order (bit-identical resumption).

pub use crate::config::DsaStage;

use crate::config::{DsaConfig, ModelConfig};
use crate::kernels::attention::{Heads, QkvLayout};
use crate::kernels::matmul::{linear_backward, linear_forward};
use crate::kernels::rope::RopeTable;
use crate::kernels::sparse_attention::{dot, invert_index};
use rayon::prelude::*;
use serde::Serialize;

#[cfg(test)]
mod tests;

/// LayerNorm epsilon of the indexer keys.
pub const K_NORM_EPS: f32 = 1e-6;

/// Offsets of one layer's indexer tensors in the flat parameter buffer.
#[derive(Clone, Copy, Debug)]
pub struct IndexerOffsets {
    /// `layers.{i}.indexer.wq` `[H_I·d_I, d]`.
    pub wq: usize,
    /// `layers.{i}.indexer.wk` `[d_I, d]`.
    pub wk: usize,
    /// `layers.{i}.indexer.k_norm.weight` `[d_I]`.
    pub k_norm_w: usize,
    /// `layers.{i}.indexer.k_norm.bias` `[d_I]`.
    pub k_norm_b: usize,
    /// `layers.{i}.indexer.weights_proj` `[H_I, d]`.
    pub wproj: usize,
}

/// The factor folded into the head weights: `H_I^-½ · d_I^-½`.
pub fn weight_scale(c: &DsaConfig) -> f32 {
    1.0 / ((c.index_n_heads * c.index_head_dim) as f32).sqrt()
}

/// The indexer RoPE table of a model config (rotate-half, the model's θ, `max_seq_len`, and
/// the model's YaRN frequency scaling when it has one, as DeepSeek's indexer shares MLA's
/// `freqs_cis`).
pub fn rope_table(c: &ModelConfig) -> Option<RopeTable> {
    c.dsa.as_ref().map(|x| {
        RopeTable::with_scaling(
            x.index_rope_dim,
            c.rope_theta,
            c.max_seq_len,
            crate::kernels::rope::RopeLayout::Half,
            c.rope_scaling.as_ref(),
        )
    })
}

/// Everything of the indexer up to the scores, for `n` rows of `a: [n, d]` at positions
/// `pos(r)`: `q: [n, H_I·d_I]` (RoPE applied), `k: [n, d_I]` (LayerNorm + RoPE), `w: [n, H_I]`
/// (scaled by [`weight_scale`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn project(
    params: &[f32],
    d: usize,
    c: &DsaConfig,
    rope: &RopeTable,
    lo: &IndexerOffsets,
    a: &[f32],
    n: usize,
    pos: &(impl Fn(usize) -> usize + Sync),
    q: &mut [f32],
    k: &mut [f32],
    w: &mut [f32],
    ln: Option<(&mut [f32], &mut [f32])>,
) {
    let (hi, di) = (c.index_n_heads, c.index_head_dim);
    assert_eq!(a.len(), n * d);
    assert_eq!(q.len(), n * hi * di);
    assert_eq!(k.len(), n * di);
    assert_eq!(w.len(), n * hi);
    let p = |o: usize, len: usize| &params[o..o + len];
    linear_forward(q, a, p(lo.wq, hi * di * d), n, d, hi * di, false);
    rope.apply(q, n, hi * di, 0, hi, di, pos, false);
    linear_forward(k, a, p(lo.wk, di * d), n, d, di, false);
    let (gamma, beta) = (p(lo.k_norm_w, di), p(lo.k_norm_b, di));
    let norm_row = |kr: &mut [f32], xh: Option<&mut [f32]>| -> f32 {
        let mean = kr.iter().sum::<f32>() / di as f32;
        let var = kr.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / di as f32;
        let rstd = 1.0 / (var + K_NORM_EPS).sqrt();
        match xh {
            Some(xh) => {
                for (i, x) in kr.iter_mut().enumerate() {
                    xh[i] = (*x - mean) * rstd;
                    *x = xh[i] * gamma[i] + beta[i];
                }
            }
            None => {
                for (i, x) in kr.iter_mut().enumerate() {
                    *x = (*x - mean) * rstd * gamma[i] + beta[i];
                }
            }
        }
        rstd
    };
    match ln {
        Some((xhat, rstd)) => k
            .par_chunks_mut(di)
            .zip(xhat.par_chunks_mut(di))
            .zip(rstd.par_iter_mut())
            .for_each(|((kr, xh), rs)| *rs = norm_row(kr, Some(xh))),
        None => k.par_chunks_mut(di).for_each(|kr| {
            norm_row(kr, None);
        }),
    }
    rope.apply(k, n, di, 0, 1, di, pos, false);
    linear_forward(w, a, p(lo.wproj, hi * d), n, d, hi, false);
    let s = weight_scale(c);
    w.iter_mut().for_each(|x| *x *= s);
}

/// One index score `I = Σ_j w_j·ReLU(q_j·k)` of a query (`q_t: [H_I·d_I]`, `w_t: [H_I]`)
/// against a key `k_s: [d_I]`.
#[inline]
pub fn score(q_t: &[f32], w_t: &[f32], k_s: &[f32]) -> f32 {
    let di = k_s.len();
    let mut acc = 0.0f32;
    for (j, &wj) in w_t.iter().enumerate() {
        let z = dot(&q_t[j * di..(j + 1) * di], k_s);
        if z > 0.0 {
            acc += wj * z;
        }
    }
    acc
}

/// Scores of one query against contiguous keys `keys: [m, d_I]` into `out[..m]`.
pub fn scores_row(q_t: &[f32], w_t: &[f32], keys: &[f32], out: &mut [f32]) {
    let di = q_t.len() / w_t.len();
    for (o, ks) in out.iter_mut().zip(keys.chunks_exact(di)) {
        *o = score(q_t, w_t, ks);
    }
}

/// The positions of the `min(k, len)` largest `scores`, ascending (a set: ties go to the
/// lower position; NaN sorts lowest). `out` is overwritten. The one top-k of the crate:
/// [`crate::kernels::indexer::topk`] (one pass with a running threshold), which the cached
/// inference path uses too, so training and inference select the same sets.
pub fn topk_select(scores: &[f32], k: usize, out: &mut Vec<u32>) {
    crate::kernels::indexer::topk(scores, k, out);
}

// ---------------------------------------------------------------------------------------
// Training: the per-layer indexer activations, the selection, the KL losses and the backward.
// ---------------------------------------------------------------------------------------

/// What one training forward pass of a DSA model does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DsaRun {
    pub stage: DsaStage,
    /// Compute the indexer KL loss (and its gradient w.r.t. the scores).
    pub kl: bool,
    /// Measure the indexer recall (share of the dense attention mass captured by the top-k);
    /// in the sparse stage this costs one extra dense attention forward per layer.
    pub recall: bool,
}

impl DsaRun {
    /// The model itself: sparse attention, no loss terms.
    pub const INFERENCE: DsaRun = DsaRun {
        stage: DsaStage::Sparse,
        kl: false,
        recall: false,
    };
}

/// Indexer statistics of one forward pass (means over layers and query tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct DsaStats {
    /// The indexer loss `L_I` (dense KL in warmup, selected-set KL in the sparse stage).
    pub kl: f64,
    /// Mean share of the dense head-summed attention mass inside the top-k set.
    pub recall: Option<f64>,
}

/// One layer's indexer activations of a training batch.
#[derive(Default)]
pub(crate) struct DsaActs {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub w: Vec<f32>,
    /// LayerNorm-normalised keys (before γ, β) and the row `1/σ`.
    pub xhat: Vec<f32>,
    pub rstd: Vec<f32>,
    /// Selected key rows `[n, k_max]` (−1 unused) and their index scores.
    pub idx: Vec<i32>,
    pub k_max: usize,
    pub isel: Vec<f32>,
    /// Key rows `[n, cols]` of the KL terms and `dL_I/dI` there (without `grad_scale`).
    pub pairs: Vec<i32>,
    pub cols: usize,
    pub di: Vec<f32>,
}

/// Shapes shared by the training helpers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shapes {
    pub b: usize,
    pub t: usize,
    pub d: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl DsaActs {
    /// Project `a` (positions `r % t`), keeping what the backward pass needs.
    pub fn project(
        &mut self,
        params: &[f32],
        c: &DsaConfig,
        rope: &RopeTable,
        lo: &IndexerOffsets,
        a: &[f32],
        sh: Shapes,
    ) {
        let n = sh.b * sh.t;
        let (hi, di) = (c.index_n_heads, c.index_head_dim);
        self.q.resize(n * hi * di, 0.0);
        self.k.resize(n * di, 0.0);
        self.w.resize(n * hi, 0.0);
        self.xhat.resize(n * di, 0.0);
        self.rstd.resize(n, 0.0);
        let t = sh.t;
        project(
            params,
            sh.d,
            c,
            rope,
            lo,
            a,
            n,
            &|r| r % t,
            &mut self.q,
            &mut self.k,
            &mut self.w,
            Some((&mut self.xhat, &mut self.rstd)),
        );
    }

    /// Top-k selection of every query row over its own sequence's prefix; fills `idx`, `isel`.
    pub fn select(&mut self, c: &DsaConfig, sh: Shapes) {
        let (b, t) = (sh.b, sh.t);
        let (hi, di) = (c.index_n_heads, c.index_head_dim);
        let k_max = c.index_topk.min(t);
        self.k_max = k_max;
        self.idx.resize(b * t * k_max, -1);
        self.isel.resize(b * t * k_max, 0.0);
        let (q, k, w) = (&self.q, &self.k, &self.w);
        self.idx
            .par_chunks_mut(k_max)
            .zip(self.isel.par_chunks_mut(k_max))
            .enumerate()
            .for_each_init(
                || (Vec::new(), Vec::new()),
                |(sc, sel), (r, (ids, isel))| {
                    let (s0, i) = (r - r % t, r % t);
                    sc.resize(i + 1, 0.0);
                    scores_row(
                        &q[r * hi * di..(r + 1) * hi * di],
                        &w[r * hi..(r + 1) * hi],
                        &k[s0 * di..(s0 + i + 1) * di],
                        sc,
                    );
                    topk_select(sc, k_max, sel);
                    ids.fill(-1);
                    isel.fill(0.0);
                    for (j, &s) in sel.iter().enumerate() {
                        ids[j] = (s0 + s as usize) as i32;
                        isel[j] = sc[s as usize];
                    }
                },
            );
    }

    /// Recompute `isel` for the current `idx` (after new projections with the selection kept).
    pub fn rescore(&mut self, c: &DsaConfig) {
        let (hi, di, k_max) = (c.index_n_heads, c.index_head_dim, self.k_max);
        let (q, k, w, idx) = (&self.q, &self.k, &self.w, &self.idx);
        self.isel
            .par_chunks_mut(k_max)
            .enumerate()
            .for_each(|(r, isel)| {
                for (j, x) in isel.iter_mut().enumerate() {
                    let s = idx[r * k_max + j];
                    *x = if s >= 0 {
                        score(
                            &q[r * hi * di..(r + 1) * hi * di],
                            &w[r * hi..(r + 1) * hi],
                            &k[s as usize * di..][..di],
                        )
                    } else {
                        0.0
                    };
                }
            });
    }

    /// The indexer loss terms of every query row and their score gradients (`× norm`).
    /// `lse(t, h)`: the row log-sum-exp of the attention whose probabilities are the target
    /// (dense in warmup: pairs = the whole prefix; sparse: pairs = the selection).
    /// Returns (Σ KL, Σ recall) over the rows; recall is only measured in warmup (top-k of I
    /// against the dense p) — see [`DsaActs::recall_dense`] for the sparse stage.
    #[allow(clippy::too_many_arguments)]
    pub fn kl(
        &mut self,
        c: &DsaConfig,
        sh: Shapes,
        qkv: &[f32],
        lay: QkvLayout,
        lse: &(dyn Fn(usize, usize) -> f32 + Sync),
        stage: DsaStage,
        norm: f32,
    ) -> (f64, f64) {
        let (b, t) = (sh.b, sh.t);
        let n = b * t;
        let (hi, di) = (c.index_n_heads, c.index_head_dim);
        let cols = if stage.is_sparse() { self.k_max } else { t };
        self.cols = cols;
        self.pairs.resize(n * cols, -1);
        self.di.resize(n * cols, 0.0);
        if stage.is_sparse() {
            self.pairs.copy_from_slice(&self.idx);
        } else {
            for (r, row) in self.pairs.chunks_mut(cols).enumerate() {
                let (s0, i) = (r - r % t, r % t);
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if j <= i { (s0 + j) as i32 } else { -1 };
                }
            }
        }
        let hp = HeadProbs::new(qkv, lay, sh);
        let (q, k, w, isel, pairs) = (&self.q, &self.k, &self.w, &self.isel, &self.pairs);
        let k_top = c.index_topk;
        let per_row: Vec<(f64, f64)> = self
            .di
            .par_chunks_mut(cols)
            .enumerate()
            .map_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(iv, pv, sel), (r, dirow)| {
                    let ids = &pairs[r * cols..(r + 1) * cols];
                    let m = ids.iter().filter(|&&x| x >= 0).count();
                    iv.resize(m, 0.0);
                    pv.resize(m, 0.0);
                    let qt = &q[r * hi * di..(r + 1) * hi * di];
                    let wt = &w[r * hi..(r + 1) * hi];
                    // Valid slots come first in both layouts (warmup: 0..=i; sparse: top-k).
                    for (j, &s) in ids[..m].iter().enumerate() {
                        iv[j] = if stage.is_sparse() {
                            isel[r * cols + j]
                        } else {
                            score(qt, wt, &k[s as usize * di..][..di])
                        };
                        pv[j] = hp.prob(r, s as usize, |h| lse(r, h));
                    }
                    let mx = iv.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let z: f64 = iv.iter().map(|&x| ((x - mx) as f64).exp()).sum();
                    let lz = mx as f64 + z.ln();
                    let mut kl = 0.0f64;
                    dirow.fill(0.0);
                    for j in 0..m {
                        let lpi = iv[j] as f64 - lz;
                        let p = pv[j] as f64;
                        if p > 0.0 {
                            kl += p * (p.ln() - lpi);
                        }
                        dirow[j] = ((lpi.exp() - p) * norm as f64) as f32;
                    }
                    let mut recall = 0.0;
                    if !stage.is_sparse() {
                        topk_select(iv, k_top, sel);
                        recall = sel.iter().map(|&j| pv[j as usize] as f64).sum();
                    }
                    (kl, recall)
                },
            )
            .collect();
        per_row
            .iter()
            .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y))
    }

    /// Σ over query rows of the dense attention mass (head-summed, `lse(t, h)` of the dense
    /// kernel) inside the selection `idx`.
    pub fn recall_dense(
        &self,
        sh: Shapes,
        qkv: &[f32],
        lay: QkvLayout,
        lse: &(dyn Fn(usize, usize) -> f32 + Sync),
    ) -> f64 {
        let hp = HeadProbs::new(qkv, lay, sh);
        let k_max = self.k_max;
        let v: Vec<f64> = self
            .idx
            .par_chunks(k_max)
            .enumerate()
            .map(|(r, ids)| {
                ids.iter()
                    .filter(|&&s| s >= 0)
                    .map(|&s| hp.prob(r, s as usize, |h| lse(r, h)) as f64)
                    .sum()
            })
            .collect();
        v.iter().sum()
    }

    /// Backward of the indexer loss into the indexer's parameters only (`a` detached):
    /// adds `grad_scale · dL_I/dθ` to `grads`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        params: &[f32],
        grads: &mut [f32],
        c: &DsaConfig,
        rope: &RopeTable,
        lo: &IndexerOffsets,
        a: &[f32],
        sh: Shapes,
        grad_scale: f32,
    ) {
        let (t, d) = (sh.t, sh.d);
        let n = sh.b * t;
        let (hi, di) = (c.index_n_heads, c.index_head_dim);
        let cols = self.cols;
        let (q, k, w, pairs, dis) = (&self.q, &self.k, &self.w, &self.pairs, &self.di);
        let mut dq = vec![0.0f32; n * hi * di];
        let mut dw = vec![0.0f32; n * hi];
        let mut dk = vec![0.0f32; n * di];
        dq.par_chunks_mut(hi * di)
            .zip(dw.par_chunks_mut(hi))
            .enumerate()
            .for_each(|(r, (dqr, dwr))| {
                let qt = &q[r * hi * di..(r + 1) * hi * di];
                let wt = &w[r * hi..(r + 1) * hi];
                for j in 0..cols {
                    let s = pairs[r * cols + j];
                    let g = dis[r * cols + j] * grad_scale;
                    if s < 0 || g == 0.0 {
                        continue;
                    }
                    let ks = &k[s as usize * di..][..di];
                    for h in 0..hi {
                        let z = dot(&qt[h * di..(h + 1) * di], ks);
                        if z > 0.0 {
                            dwr[h] += g * z;
                            let f = g * wt[h];
                            for (x, y) in dqr[h * di..(h + 1) * di].iter_mut().zip(ks) {
                                *x += f * y;
                            }
                        }
                    }
                }
            });
        let (offsets, entries) = invert_index(pairs, n);
        dk.par_chunks_mut(di).enumerate().for_each(|(s, dks)| {
            let ks = &k[s * di..(s + 1) * di];
            for &slot in &entries[offsets[s]..offsets[s + 1]] {
                let r = slot / cols;
                let g = dis[slot] * grad_scale;
                if g == 0.0 {
                    continue;
                }
                let qt = &q[r * hi * di..(r + 1) * hi * di];
                for h in 0..hi {
                    let qh = &qt[h * di..(h + 1) * di];
                    if dot(qh, ks) > 0.0 {
                        let f = g * w[r * hi + h];
                        for (x, y) in dks.iter_mut().zip(qh) {
                            *x += f * y;
                        }
                    }
                }
            }
        });
        let p = |o: usize, len: usize| &params[o..o + len];
        // Head weights: w = scale · a·Wprojᵀ.
        let s = weight_scale(c);
        dw.iter_mut().for_each(|x| *x *= s);
        linear_backward(
            None,
            &mut grads[lo.wproj..lo.wproj + hi * d],
            &dw,
            a,
            p(lo.wproj, hi * d),
            n,
            d,
            hi,
        );
        // Queries.
        rope.apply(&mut dq, n, hi * di, 0, hi, di, |r| r % t, true);
        linear_backward(
            None,
            &mut grads[lo.wq..lo.wq + hi * di * d],
            &dq,
            a,
            p(lo.wq, hi * di * d),
            n,
            d,
            hi * di,
        );
        // Keys: RoPE, then LayerNorm y = x̂·γ + β.
        rope.apply(&mut dk, n, di, 0, 1, di, |r| r % t, true);
        let gamma = p(lo.k_norm_w, di);
        let mut dgamma = vec![0.0f32; di];
        let mut dbeta = vec![0.0f32; di];
        for (dy, xh) in dk.chunks(di).zip(self.xhat.chunks(di)) {
            for i in 0..di {
                dgamma[i] += dy[i] * xh[i];
                dbeta[i] += dy[i];
            }
        }
        dk.par_chunks_mut(di)
            .zip(self.xhat.par_chunks(di))
            .zip(self.rstd.par_iter())
            .for_each(|((dy, xh), &rs)| {
                let mut m1 = 0.0f32;
                let mut m2 = 0.0f32;
                for i in 0..di {
                    let g = dy[i] * gamma[i];
                    m1 += g;
                    m2 += g * xh[i];
                }
                m1 /= di as f32;
                m2 /= di as f32;
                for i in 0..di {
                    dy[i] = rs * (dy[i] * gamma[i] - m1 - xh[i] * m2);
                }
            });
        for (g, x) in grads[lo.k_norm_w..lo.k_norm_w + di].iter_mut().zip(&dgamma) {
            *g += x;
        }
        for (g, x) in grads[lo.k_norm_b..lo.k_norm_b + di].iter_mut().zip(&dbeta) {
            *g += x;
        }
        linear_backward(
            None,
            &mut grads[lo.wk..lo.wk + di * d],
            &dk,
            a,
            p(lo.wk, di * d),
            n,
            d,
            di,
        );
    }
}

/// Head-summed attention probabilities `(1/H)·Σ_h exp(q_h(t)·k_g(s)/√d_h − lse_h(t))`
/// recomputed from a fused q|k|v buffer.
struct HeadProbs<'a> {
    q: Heads<'a>,
    k: Heads<'a>,
    h: usize,
    rep: usize,
    hd: usize,
    scale: f32,
}

impl<'a> HeadProbs<'a> {
    fn new(qkv: &'a [f32], lay: QkvLayout, sh: Shapes) -> Self {
        HeadProbs {
            q: Heads {
                data: qkv,
                rs: lay.rs,
                off: lay.q_off,
            },
            k: Heads {
                data: qkv,
                rs: lay.rs,
                off: lay.k_off,
            },
            h: sh.n_heads,
            rep: sh.n_heads / sh.n_kv_heads,
            hd: sh.head_dim,
            scale: 1.0 / (sh.head_dim as f32).sqrt(),
        }
    }

    fn prob(&self, t: usize, s: usize, lse: impl Fn(usize) -> f32) -> f32 {
        let hd = self.hd;
        let mut acc = 0.0f32;
        for h in 0..self.h {
            let g = h / self.rep;
            let qh = &self.q.data[t * self.q.rs + self.q.off + h * hd..][..hd];
            let ks = &self.k.data[s * self.k.rs + self.k.off + g * hd..][..hd];
            let l = lse(h);
            if l.is_finite() {
                acc += (dot(qh, ks) * self.scale - l).exp();
            }
        }
        acc / self.h as f32
    }
}
