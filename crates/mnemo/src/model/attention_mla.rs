//! Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434 §2.1), the attention
//! variant of a model with `cfg.mla` (inference only), as llama.cpp's `deepseek2` computes it.
//!
//! With `H` heads, `d_n` = `qk_nope_head_dim`, `d_r` = `rope_dim` (`qk_rope_head_dim`),
//! `d_v` = `v_head_dim`, `r` = `kv_lora_rank`, for a row `a: [d]` at position `p`:
//!
//! ```text
//! q      = a·W_qᵀ  |  RMSNorm(a·W_qaᵀ)·W_qbᵀ            [H, d_n + d_r]  (q_lora_rank = 0 | > 0)
//! q_h    = [q_n,h ; RoPE_p(q_r,h)]
//! [c̃; k̃] = a·W_kvaᵀ                                     [r + d_r]
//! c      = RMSNorm(c̃) ⊙ w_kv_norm                        [r]       the latent: all the cache keeps
//! k_r    = RoPE_p(k̃)                                    [d_r]     shared by every head (cached too)
//! [W_UK,h; W_UV,h] = rows h·(d_n+d_v) .. of W_kvb        [d_n, r], [d_v, r]
//! k_h,j  = [W_UK,h·c_j ; k_r,j]     v_h,j = W_UV,h·c_j
//! o_h    = Σ_j softmax_j(s·q_h·k_h,j)·v_h,j              s = mscale² / √(d_n + d_r)
//! out    = [o_1 … o_H]·W_oᵀ                              [d]
//! ```
//!
//! `mscale = 1 + 0.1·m·ln(factor)` with YaRN scaling (`m` = `mscale_all_dim`, llama.cpp's
//! `rope.scaling.yarn_log_multiplier / 0.1`), else 1: [`ModelConfig::attn_scale`] with
//! `head_dim = d_n + d_r`. RoPE pairs adjacent channels (llama.cpp's "normal" RoPE: mnemo's
//! `interleaved` layout) with YaRN frequencies, cos/sin unscaled.
//!
//! **Two evaluation orders.** The full forward ([`super::attention::Kv::Batch`]) decompresses
//! every key and value as written above. The cached drivers ([`super::attention::Kv::Cache`])
//! keep per token only `[c_j ; k_r,j]` (`r + d_r` floats instead of `H·(d_n + d_r + d_v)`) and
//! absorb the decompression into the query and the output, as llama.cpp's MLA path does:
//!
//! ```text
//! q̃_h   = W_UK,hᵀ·q_n,h                                 [r]       (query in latent space)
//! score = s·(q̃_h·c_j + q_r,h·k_r,j)                     = s·q_h·k_h,j
//! õ_h   = Σ_j softmax_j(score)·c_j                       [r]
//! o_h   = W_UV,h·õ_h                                     = Σ_j softmax_j·W_UV,h·c_j
//! ```
//!
//! Both are exact rewrites of the same sums: `q_n·(W_UK c) = (W_UKᵀ q_n)·c` (associativity of
//! the matrix products) and `Σ_j p_j·(W_UV c_j) = W_UV·Σ_j p_j c_j` (linearity), so the orders
//! differ only in float rounding (`tests`: full forward = cached prefill = one-token decoding).

use super::attention::{Kv, Span};
use super::decode::{profile, Plan};
use super::layout::LayoutBuilder;
use super::Model;
use crate::config::{MlaConfig, ModelConfig};
use crate::kernels::matmul::linear_forward;
use crate::kernels::rmsnorm;
use rayon::prelude::*;

/// How a layer projects its queries.
#[derive(Clone, Copy, Debug)]
pub enum MlaQuery {
    /// `W_q: [H·(d_n+d_r), d]`.
    Direct { wq: usize },
    /// `W_qa: [q_lora_rank, d]`, its norm `[q_lora_rank]`, `W_qb: [H·(d_n+d_r), q_lora_rank]`.
    LowRank {
        wq_a: usize,
        norm: usize,
        wq_b: usize,
    },
}

/// Offsets of one layer's MLA tensors (`layers.{i}.attention.*`).
#[derive(Clone, Copy, Debug)]
pub struct MlaOffsets {
    pub q: MlaQuery,
    /// `W_kva: [r + d_r, d]`.
    pub wkv_a: usize,
    /// `[r]`.
    pub kv_norm: usize,
    /// `W_kvb: [H·(d_n+d_v), r]`: per head `W_UK,h` then `W_UV,h` (Hugging Face's `kv_b_proj`).
    pub wkv_b: usize,
    /// `W_o: [d, H·d_v]`.
    pub wo: usize,
}

/// The shapes of a model's MLA.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MlaDims {
    pub h: usize,
    pub dn: usize,
    pub dr: usize,
    pub dv: usize,
    pub r: usize,
    pub rq: usize,
}

impl MlaDims {
    pub(crate) fn of(c: &ModelConfig, m: &MlaConfig) -> Self {
        MlaDims {
            h: c.n_heads,
            dn: m.qk_nope_head_dim,
            dr: c.rope_dim,
            dv: m.v_head_dim,
            r: m.kv_lora_rank,
            rq: m.q_lora_rank,
        }
    }
    /// Query width per row.
    fn qw(&self) -> usize {
        self.h * (self.dn + self.dr)
    }
    /// Cached floats per token: `[c ; k_r]`.
    pub(crate) fn cache_width(&self) -> usize {
        self.r + self.dr
    }
}

impl MlaOffsets {
    /// Lay out the tensors of one layer, named by `p`.
    pub(crate) fn add(
        bld: &mut LayoutBuilder,
        c: &ModelConfig,
        m: &MlaConfig,
        p: &dyn Fn(&str) -> String,
    ) -> Self {
        let (dm, k) = (c.d_model, MlaDims::of(c, m));
        let q = if k.rq == 0 {
            MlaQuery::Direct {
                wq: bld.add(p("attention.wq.weight"), vec![k.qw(), dm], true),
            }
        } else {
            MlaQuery::LowRank {
                wq_a: bld.add(p("attention.wq_a.weight"), vec![k.rq, dm], true),
                norm: bld.add(p("attention.q_a_norm.weight"), vec![k.rq], false),
                wq_b: bld.add(p("attention.wq_b.weight"), vec![k.qw(), k.rq], true),
            }
        };
        MlaOffsets {
            q,
            wkv_a: bld.add(p("attention.wkv_a.weight"), vec![k.r + k.dr, dm], true),
            kv_norm: bld.add(p("attention.kv_a_norm.weight"), vec![k.r], false),
            wkv_b: bld.add(
                p("attention.wkv_b.weight"),
                vec![k.h * (k.dn + k.dv), k.r],
                true,
            ),
            wo: bld.add(p("attention.wo.weight"), vec![dm, k.h * k.dv], true),
        }
    }
}

/// Scratch of one block's MLA forward.
#[derive(Default)]
pub(crate) struct MlaActs {
    /// Queries `[N, H·(d_n+d_r)]` (the RoPE part rotated in place).
    q: Vec<f32>,
    /// Low-rank query input `[N, q_lora_rank]` and its norm's `1/rms` `[N]`.
    qa: Vec<f32>,
    rstd: Vec<f32>,
    /// `[c̃; k̃]` `[N, r + d_r]`, then the latent `c` `[N, r]` and `k_r` `[N, d_r]`.
    kva: Vec<f32>,
    c: Vec<f32>,
    kr: Vec<f32>,
    /// The full forward's decompressed `[k_n | v]` per head `[N, H·(d_n+d_v)]`.
    kvb: Vec<f32>,
    /// Attention output `[N, H·d_v]`.
    o: Vec<f32>,
}

impl Model {
    /// The MLA sublayer of block `l` on its normed input `a: [N, d]`: writes (`acc`: adds)
    /// `o·W_oᵀ` into `out: [N, d]` (module docs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mla_attention_forward(
        &self,
        l: usize,
        mo: &MlaOffsets,
        a: &[f32],
        kv: &mut Kv,
        plan: &Plan,
        acts: &mut MlaActs,
        out: &mut [f32],
        acc: bool,
    ) {
        let c = &self.cfg;
        let k = MlaDims::of(c, c.mla.as_ref().expect("an MLA model"));
        let (dm, n) = (c.d_model, a.len() / c.d_model);
        let (qw, eps) = (k.qw(), c.norm_eps);
        acts.q.resize(n * qw, 0.0);
        match mo.q {
            MlaQuery::Direct { wq } => {
                self.lin(plan, profile::QKV, &mut acts.q, a, wq, n, dm, qw, false)
            }
            MlaQuery::LowRank { wq_a, norm, wq_b } => {
                acts.qa.resize(n * k.rq, 0.0);
                acts.rstd.resize(n, 0.0);
                self.lin(
                    plan,
                    profile::QKV,
                    &mut acts.qa,
                    a,
                    wq_a,
                    n,
                    dm,
                    k.rq,
                    false,
                );
                let x = acts.qa.clone();
                let w = self.w(norm, k.rq);
                rmsnorm::forward(&mut acts.qa, &mut acts.rstd, &x, w, k.rq, eps);
                self.lin(
                    plan,
                    profile::QKV,
                    &mut acts.q,
                    &acts.qa,
                    wq_b,
                    n,
                    k.rq,
                    qw,
                    false,
                );
            }
        }
        let kw = k.cache_width();
        acts.kva.resize(n * kw, 0.0);
        self.lin(
            plan,
            profile::QKV,
            &mut acts.kva,
            a,
            mo.wkv_a,
            n,
            dm,
            kw,
            false,
        );
        acts.c.resize(n * k.r, 0.0);
        acts.kr.resize(n * k.dr, 0.0);
        acts.rstd.resize(n, 0.0);
        for ((row, kr), c_) in acts
            .kva
            .chunks_exact(kw)
            .zip(acts.kr.chunks_exact_mut(k.dr))
            .zip(acts.c.chunks_exact_mut(k.r))
        {
            kr.copy_from_slice(&row[k.r..]);
            c_.copy_from_slice(&row[..k.r]);
        }
        let x = acts.c.clone();
        rmsnorm::forward(
            &mut acts.c,
            &mut acts.rstd,
            &x,
            self.w(mo.kv_norm, k.r),
            k.r,
            eps,
        );
        acts.o.resize(n * k.h * k.dv, 0.0);
        let scale = c.attn_scale();
        match kv {
            Kv::Batch { t, .. } => {
                let t = *t;
                self.mla_rope(&k, acts, 0, n, |r| r % t);
                let kvw = k.h * (k.dn + k.dv);
                acts.kvb.resize(n * kvw, 0.0);
                linear_forward(
                    &mut acts.kvb,
                    &acts.c,
                    self.w(mo.wkv_b, kvw * k.r),
                    n,
                    k.r,
                    kvw,
                    false,
                );
                mla_batch(&k, t, scale, acts);
            }
            Kv::Cache(spans) => {
                let t0 = profile::start();
                for sp in spans.iter_mut() {
                    self.mla_cached(l, mo, &k, scale, sp, acts);
                }
                profile::stop(profile::ATTN, t0);
            }
        }
        self.lin(
            plan,
            profile::WO,
            out,
            &acts.o,
            mo.wo,
            n,
            k.h * k.dv,
            dm,
            acc,
        );
    }

    /// RoPE of rows `r0..r0 + ni`: each head's last `d_r` query channels and the shared key.
    fn mla_rope(
        &self,
        k: &MlaDims,
        acts: &mut MlaActs,
        r0: usize,
        ni: usize,
        pos: impl Fn(usize) -> usize + Sync,
    ) {
        let hd = k.dn + k.dr;
        let mut qr = vec![0.0f32; ni * k.h * k.dr];
        let q = &mut acts.q[r0 * k.qw()..(r0 + ni) * k.qw()];
        for (row, qrr) in q.chunks_exact(k.qw()).zip(qr.chunks_exact_mut(k.h * k.dr)) {
            for h in 0..k.h {
                qrr[h * k.dr..(h + 1) * k.dr].copy_from_slice(&row[h * hd + k.dn..(h + 1) * hd]);
            }
        }
        self.rope
            .apply(&mut qr, ni, k.h * k.dr, 0, k.h, k.dr, &pos, false);
        for (row, qrr) in q.chunks_exact_mut(k.qw()).zip(qr.chunks_exact(k.h * k.dr)) {
            for h in 0..k.h {
                row[h * hd + k.dn..(h + 1) * hd].copy_from_slice(&qrr[h * k.dr..(h + 1) * k.dr]);
            }
        }
        let kr = &mut acts.kr[r0 * k.dr..(r0 + ni) * k.dr];
        self.rope.apply(kr, ni, k.dr, 0, 1, k.dr, &pos, false);
    }

    /// One sequence's rows of a cached forward: RoPE at their positions, `[c ; k_r]` appended
    /// to the cache, then absorbed attention over the whole cache (module docs).
    fn mla_cached(
        &self,
        l: usize,
        mo: &MlaOffsets,
        k: &MlaDims,
        scale: f32,
        sp: &mut Span,
        acts: &mut MlaActs,
    ) {
        let (r0, ni, p0) = (sp.r0, sp.n, sp.p0);
        self.mla_rope(k, acts, r0, ni, |r| p0 + r);
        let kw = k.cache_width();
        let (kc, _) = sp.cache.layer_mut(l);
        for r in 0..ni {
            let row = &mut kc[(p0 + r) * kw..(p0 + r + 1) * kw];
            row[..k.r].copy_from_slice(&acts.c[(r0 + r) * k.r..(r0 + r + 1) * k.r]);
            row[k.r..].copy_from_slice(&acts.kr[(r0 + r) * k.dr..(r0 + r + 1) * k.dr]);
        }
        let (kc, _, _) = sp.cache.attention_parts(l, p0 + ni);
        let wkvb = self.w(mo.wkv_b, k.h * (k.dn + k.dv) * k.r);
        let (hd, qw, ov) = (k.dn + k.dr, k.qw(), k.h * k.dv);
        let q = &acts.q[r0 * qw..(r0 + ni) * qw];
        acts.o[r0 * ov..(r0 + ni) * ov]
            .par_chunks_mut(k.dv)
            .enumerate()
            .for_each(|(i, o)| {
                let (r, h) = (i / k.h, i % k.h);
                let qh = &q[r * qw + h * hd..r * qw + (h + 1) * hd];
                let wh = &wkvb[h * (k.dn + k.dv) * k.r..(h + 1) * (k.dn + k.dv) * k.r];
                // q̃ = W_UKᵀ·q_n: the rows of W_UK weighted by the query's nope channels.
                let mut qt = vec![0.0f32; k.r];
                for (j, &qj) in qh[..k.dn].iter().enumerate() {
                    for (x, &w) in qt.iter_mut().zip(&wh[j * k.r..(j + 1) * k.r]) {
                        *x += qj * w;
                    }
                }
                let len = p0 + r + 1;
                let mut s: Vec<f32> = kc[..len * kw]
                    .chunks_exact(kw)
                    .map(|e| scale * (dot(&qt, &e[..k.r]) + dot(&qh[k.dn..], &e[k.r..])))
                    .collect();
                softmax(&mut s);
                let mut lat = vec![0.0f32; k.r];
                for (&p, e) in s.iter().zip(kc.chunks_exact(kw)) {
                    for (x, &cj) in lat.iter_mut().zip(&e[..k.r]) {
                        *x += p * cj;
                    }
                }
                let wuv = &wh[k.dn * k.r..];
                for (m, om) in o.iter_mut().enumerate() {
                    *om = dot(&wuv[m * k.r..(m + 1) * k.r], &lat);
                }
            });
    }
}

/// The full forward's causal attention over decompressed keys and values, per sequence of
/// `t` rows and head (module docs): `acts.q` (RoPE applied), `acts.kvb`, `acts.kr` → `acts.o`.
fn mla_batch(k: &MlaDims, t: usize, scale: f32, acts: &mut MlaActs) {
    let (hd, qw, kvw) = (k.dn + k.dr, k.qw(), k.h * (k.dn + k.dv));
    let (q, kvb, kr) = (&acts.q, &acts.kvb, &acts.kr);
    acts.o.par_chunks_mut(k.dv).enumerate().for_each(|(i, o)| {
        let (row, h) = (i / k.h, i % k.h);
        let first = row - row % t;
        let qh = &q[row * qw + h * hd..row * qw + (h + 1) * hd];
        let kv_of = |j: usize| &kvb[j * kvw + h * (k.dn + k.dv)..j * kvw + (h + 1) * (k.dn + k.dv)];
        let mut s: Vec<f32> = (first..=row)
            .map(|j| {
                let kn = &kv_of(j)[..k.dn];
                scale * (dot(&qh[..k.dn], kn) + dot(&qh[k.dn..], &kr[j * k.dr..(j + 1) * k.dr]))
            })
            .collect();
        softmax(&mut s);
        o.fill(0.0);
        for (&p, j) in s.iter().zip(first..=row) {
            for (x, &v) in o.iter_mut().zip(&kv_of(j)[k.dn..]) {
                *x += p * v;
            }
        }
    });
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn softmax(s: &mut [f32]) {
    let m = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut z = 0.0f32;
    for x in s.iter_mut() {
        *x = (*x - m).exp();
        z += *x;
    }
    for x in s.iter_mut() {
        *x /= z;
    }
}
