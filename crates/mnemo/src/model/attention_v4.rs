//! The DeepSeek-V4 variant of the attention sublayer, as transformers 5.23.0's
//! `DeepseekV4Attention` computes it (`docs/deepseek-v4-equations.md` §3.5–3.9; the equations
//! below use its notation). Forward over a batch of `b` sequences × `t` positions.
//!
//! ```text
//! a: [N, D] (normed input)
//! q_res = rms(a·Wq_aᵀ; q_norm)                                  [N, Q]
//! q     = rope(urms((q_res·Wq_bᵀ)[h]), t)                        [N, H, d]  per head
//! kv    = rope(rms(a·Wkvᵀ; kv_norm), t)                          [N, d]     one K = V head
//! c[w]  = rope(rms(pool_w(a·Wc_kvᵀ, a·Wc_gateᵀ + ape); c_norm), w·m)   compressed entries
//!         HCA: window w of m tokens; CSA: the second half of window w and the first of w−1
//! CSA:  TopK(t) = the index_topk best entries of I[t,w] = Σ_h ω[t,h]·ReLU(qᴵ[t,h]·Kᴵ[w])/√dᴵ
//! o[t,h] = rope⁻¹( Σ_s p_s·KV[s], t )   over the window rows t−W < s ≤ t and the entries
//!          w < ⌊(t+1)/m⌋ (CSA: those in TopK(t)); p = softmax(q·KV/√d) with the sink σ_h as
//!          an extra logit that only joins the denominator
//! out (+)= (o grouped: o[:, γ]·Wo_a[γ]ᵀ for γ < g)·Wo_bᵀ          [N, D]
//! ```
//!
//! `rope` rotates the **last** `r = qk_rope_head_dim` channels in adjacent pairs; sliding
//! layers use `rope_theta`, compressed layers (their queries, keys, entries and indexer)
//! `compress_rope_theta` with YaRN (`compress_rope_scaling`).

use super::attention::Kv;
pub use super::attention_v4_rope::V4Rope;
use super::decode::Plan;
use super::layout::LayoutBuilder;
use super::Model;
use crate::config::{ModelConfig, V4LayerType};
use crate::kernels::matmul::linear_backward;
use crate::kernels::rmsnorm;
use crate::kernels::torch_topk::torch_topk_visible;
use crate::kernels::vecops::axpy;
pub(super) use crate::kernels::vecops::dot;
use rayon::prelude::*;

/// Offsets of one compressor (of the attention or of the indexer).
#[derive(Clone, Copy, Debug)]
pub struct CompressorOffsets {
    /// `[cw, D]` each (`cw = 2·dim` overlapping, `dim` not).
    pub wkv: usize,
    pub wgate: usize,
    /// Position bias `[m, cw]`.
    pub ape: usize,
    /// Entry norm `[dim]`.
    pub norm: usize,
    /// Entry width.
    pub dim: usize,
    /// Tokens per entry.
    pub ratio: usize,
    /// CSA: entries pool two windows (the second half of the projection the current one).
    pub overlap: bool,
    /// The indexer's compressor (its entries are the index keys `Kᴵ`), not the attention's.
    pub index_keys: bool,
}

impl CompressorOffsets {
    /// Projection width `cw` (`2·dim` overlapping, `dim` not).
    pub fn width(&self) -> usize {
        if self.overlap {
            2 * self.dim
        } else {
            self.dim
        }
    }

    /// The first position whose projections entry `w` pools (CSA: the window before it).
    pub fn first_pos(&self, w: usize) -> usize {
        if self.overlap {
            w.saturating_sub(1) * self.ratio
        } else {
            w * self.ratio
        }
    }
}

/// Offsets of a CSA layer's lightning indexer.
#[derive(Clone, Copy, Debug)]
pub struct IndexerV4Offsets {
    pub comp: CompressorOffsets,
    /// `[Hi·di, Q]`.
    pub wq_b: usize,
    /// `[Hi, D]`.
    pub weights_proj: usize,
}

/// Offsets of one DeepSeek-V4 attention sublayer (official names under `layers.{i}.attn.`).
#[derive(Clone, Copy, Debug)]
pub struct V4AttnOffsets {
    pub wq_a: usize,
    pub q_norm: usize,
    pub wq_b: usize,
    pub wkv: usize,
    pub kv_norm: usize,
    pub wo_a: usize,
    pub wo_b: usize,
    pub sink: usize,
    pub kind: V4LayerType,
    pub compressor: Option<CompressorOffsets>,
    pub indexer: Option<IndexerV4Offsets>,
}

fn add_compressor(
    bld: &mut LayoutBuilder,
    p: &str,
    d_model: usize,
    dim: usize,
    ratio: usize,
    (overlap, index_keys): (bool, bool),
) -> CompressorOffsets {
    let cw = if overlap { 2 * dim } else { dim };
    CompressorOffsets {
        wkv: bld.add(format!("{p}.wkv.weight"), vec![cw, d_model], true),
        wgate: bld.add(format!("{p}.wgate.weight"), vec![cw, d_model], true),
        ape: bld.add(format!("{p}.ape"), vec![ratio, cw], false),
        norm: bld.add(format!("{p}.norm.weight"), vec![dim], false),
        dim,
        ratio,
        overlap,
        index_keys,
    }
}

impl V4AttnOffsets {
    /// Lay out layer `l`'s attention tensors (`prefix` = `layers.{l}.attn`).
    pub(crate) fn add(bld: &mut LayoutBuilder, prefix: &str, c: &ModelConfig, l: usize) -> Self {
        let v = c.v4.as_ref().expect("a DeepSeek-V4 config");
        let (dm, h, d) = (c.d_model, c.n_heads, c.head_dim);
        let (q, g, r) = (v.q_lora_rank, v.o_groups, v.o_lora_rank);
        let p = |s: &str| format!("{prefix}.{s}");
        let wq_a = bld.add(p("wq_a.weight"), vec![q, dm], true);
        let q_norm = bld.add(p("q_norm.weight"), vec![q], false);
        let wq_b = bld.add(p("wq_b.weight"), vec![h * d, q], true);
        let wkv = bld.add(p("wkv.weight"), vec![d, dm], true);
        let kv_norm = bld.add(p("kv_norm.weight"), vec![d], false);
        let wo_a = bld.add(p("wo_a.weight"), vec![g * r, h * d / g], true);
        let wo_b = bld.add(p("wo_b.weight"), vec![dm, g * r], true);
        let sink = bld.add(p("attn_sink"), vec![h], false);
        let kind = v.layer_types[l];
        let m = v.ratio(l);
        let csa = kind == V4LayerType::CompressedSparseAttention;
        let compressor =
            (m > 0).then(|| add_compressor(bld, &p("compressor"), dm, d, m, (csa, false)));
        let indexer = csa.then(|| {
            let (hi, di) = (v.index_n_heads, v.index_head_dim);
            IndexerV4Offsets {
                comp: add_compressor(bld, &p("indexer.compressor"), dm, di, m, (true, true)),
                wq_b: bld.add(p("indexer.wq_b.weight"), vec![hi * di, q], true),
                weights_proj: bld.add(p("indexer.weights_proj.weight"), vec![hi, dm], true),
            }
        });
        V4AttnOffsets {
            wq_a,
            q_norm,
            wq_b,
            wkv,
            kv_norm,
            wo_a,
            wo_b,
            sink,
            kind,
            compressor,
            indexer,
        }
    }
}

/// `x / √(mean(x²) + ε)` over each `c`-wide vector, in place; returns each `1/rms`.
fn urms(x: &mut [f32], c: usize, eps: f32) -> Vec<f32> {
    x.chunks_mut(c)
        .map(|v| {
            let ms = v.iter().map(|&u| u * u).sum::<f32>() / c as f32;
            let s = 1.0 / (ms + eps).sqrt();
            v.iter_mut().for_each(|u| *u *= s);
            s
        })
        .collect()
}

/// The `(token, column)` of every pooling slot of entry `w`, channel `ch` (§3.6, §3.7): CSA
/// entries pool the first half of window `w − 1` and the second half of window `w`.
fn pool_slots(
    co: &CompressorOffsets,
    w: usize,
    ch: usize,
) -> impl Iterator<Item = (usize, usize)> + Clone {
    let (m, dim, ov) = (co.ratio, co.dim, co.overlap);
    let prev = (ov && w >= 1).then(|| ((w - 1) * m..w * m).map(move |tau| (tau, ch)));
    let cur = (w * m..(w + 1) * m).map(move |tau| (tau, if ov { dim + ch } else { ch }));
    prev.into_iter().flatten().chain(cur)
}

/// Pool entry `w` into `e: [dim]` from a compressor's values and logits (`[rows, cw]` each,
/// row `i` = position `base + i`): per channel, a softmax over the logits of its slots.
pub(super) fn pool_entry(
    co: &CompressorOffsets,
    w: usize,
    (ckv, cg): (&[f32], &[f32]),
    base: usize,
    e: &mut [f32],
) {
    let cw = co.width();
    for (ch, ev) in e.iter_mut().enumerate() {
        let slots = pool_slots(co, w, ch).map(|(tau, col)| (tau - base) * cw + col);
        let mx = slots
            .clone()
            .fold(f32::NEG_INFINITY, |acc, i| acc.max(cg[i]));
        let (mut den, mut num) = (0.0f32, 0.0f32);
        for i in slots {
            let p = (cg[i] - mx).exp();
            den += p;
            num += p * ckv[i];
        }
        *ev = num / den;
    }
}

/// A compressor's activations over one sequence: projections `[t, cw]` (the logits with the
/// position bias added), pooled entries before the norm `[N, dim]`, their `1/rms`.
#[derive(Default, Clone)]
pub(crate) struct CompActs {
    ckv: Vec<f32>,
    cg: Vec<f32>,
    e: Vec<f32>,
    rstd: Vec<f32>,
}

/// The V4 attention's activations of one block, kept for the backward pass.
#[derive(Default)]
pub(crate) struct V4Acts {
    /// `a·Wq_aᵀ` `[N, Q]`, its `1/rms`, and `q_res` (normed).
    pub(super) qa: Vec<f32>,
    pub(super) qa_rstd: Vec<f32>,
    pub(super) q_res: Vec<f32>,
    /// `q_res·Wq_bᵀ` `[N, H·d]` before the per-head norm, its `1/rms` `[N·H]`, and `q` (normed,
    /// roped).
    pub(super) qf: Vec<f32>,
    pub(super) qf_rstd: Vec<f32>,
    pub(super) q: Vec<f32>,
    /// `a·Wkvᵀ` `[N, d]`, its `1/rms`, `kv` (normed, roped).
    pub(super) kv0: Vec<f32>,
    pub(super) kv_rstd: Vec<f32>,
    pub(super) kv: Vec<f32>,
    /// Per sequence: the compressor's activations, the entries `[N_e, d]`, the CSA selection.
    pub(super) comp: Vec<CompActs>,
    pub(super) entries: Vec<Vec<f32>>,
    pub(super) sel: Vec<Option<Vec<Vec<usize>>>>,
    /// The attention output after the inverse rope `[N, H·d]`, and the grouped `z` `[N, g·R]`.
    pub(super) o: Vec<f32>,
    pub(super) z: Vec<f32>,
    /// CSA layers in a DSA training stage: per sequence, the indexer's activations and loss.
    pub(super) index: Vec<super::attention_v4_indexer::IndexActs>,
}

impl Model {
    /// The rope of layer `l` of a DeepSeek-V4 model.
    pub(super) fn v4_rope(&self, l: usize) -> V4Rope {
        let v = self.cfg.v4.as_ref().expect("a DeepSeek-V4 config");
        match v.layer_types[l] {
            V4LayerType::SlidingAttention => V4Rope::main(&self.cfg, v.qk_rope_head_dim),
            _ => V4Rope::compress(v, v.qk_rope_head_dim),
        }
    }

    /// A compressor's projections of rows `x: [n, D]` at positions `pos0..`: the values
    /// `a·Wc_kvᵀ` and the pooling logits `a·Wc_gateᵀ + ape[pos mod m]`, `[n, cw]` each.
    pub(super) fn v4_comp_project(
        &self,
        co: &CompressorOffsets,
        x: &[f32],
        pos0: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let dm = self.cfg.d_model;
        let t = x.len() / dm;
        let m = co.ratio;
        let cw = co.width();
        let mut ckv = vec![0.0f32; t * cw];
        let mut cg = vec![0.0f32; t * cw];
        // `lin` on `Plan::F32`: f32, or a packed-only model's mapped BF16 weights.
        use super::decode::profile::QKV;
        self.lin(&Plan::F32, QKV, &mut ckv, x, co.wkv, t, dm, cw, false);
        self.lin(&Plan::F32, QKV, &mut cg, x, co.wgate, t, dm, cw, false);
        let ape = self.w(co.ape, m * cw);
        for (r, row) in cg.chunks_mut(cw).enumerate() {
            let j = (pos0 + r) % m;
            row.iter_mut()
                .zip(&ape[j * cw..(j + 1) * cw])
                .for_each(|(g, b)| *g += b);
        }
        (ckv, cg)
    }

    /// Entries `w0..w0 + k` from their pooled values `e: [k, dim]`: normed and roped at their
    /// first position `w·m`; returns the entries and each `1/rms`.
    pub(super) fn v4_comp_finish(
        &self,
        co: &CompressorOffsets,
        e: &[f32],
        w0: usize,
        rope: &V4Rope,
    ) -> (Vec<f32>, Vec<f32>) {
        let dim = co.dim;
        let k = e.len() / dim;
        let mut out = vec![0.0f32; k * dim];
        let mut rstd = vec![0.0f32; k];
        rmsnorm::forward(
            &mut out,
            &mut rstd,
            e,
            self.w(co.norm, dim),
            dim,
            self.cfg.norm_eps,
        );
        let mut cs = vec![0.0f32; rope.table_len()];
        for (i, row) in out.chunks_mut(dim).enumerate() {
            rope.table((w0 + i) * co.ratio, &mut cs);
            V4Rope::rotate(&cs, row, dim, false);
        }
        self.official_entries(co, &mut out);
        (out, rstd)
    }

    /// A compressor's projections ([`Model::v4_comp_project`]) of the rows `x: [b·t, D]` of
    /// `b` sequences of `t` rows at once (one product per weight; each row's position is its
    /// index in its sequence).
    pub(super) fn v4_comp_project_seqs(
        &self,
        co: &CompressorOffsets,
        x: &[f32],
        t: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let dm = self.cfg.d_model;
        let n = x.len() / dm;
        let (m, cw) = (co.ratio, co.width());
        let mut ckv = vec![0.0f32; n * cw];
        let mut cg = vec![0.0f32; n * cw];
        use super::decode::profile::QKV;
        self.lin(&Plan::F32, QKV, &mut ckv, x, co.wkv, n, dm, cw, false);
        self.lin(&Plan::F32, QKV, &mut cg, x, co.wgate, n, dm, cw, false);
        let ape = self.w(co.ape, m * cw);
        for (r, row) in cg.chunks_mut(cw).enumerate() {
            let j = (r % t) % m;
            row.iter_mut()
                .zip(&ape[j * cw..(j + 1) * cw])
                .for_each(|(g, b)| *g += b);
        }
        (ckv, cg)
    }

    /// The compressed entries `[⌊t/m⌋, dim]` of one sequence (§3.6, §3.7) from its
    /// projections `(ckv, cg)` (`[t, cw]` each, [`Model::v4_comp_project`]), keeping in `ca`
    /// what the backward pass needs.
    pub(super) fn v4_compress_projected(
        &self,
        co: &CompressorOffsets,
        (ckv, cg): (Vec<f32>, Vec<f32>),
        rope: &V4Rope,
        ca: &mut CompActs,
    ) -> Vec<f32> {
        let t = ckv.len() / co.width().max(1);
        let (dim, n_e) = (co.dim, t / co.ratio);
        if n_e == 0 {
            *ca = CompActs::default();
            return Vec::new();
        }
        (ca.ckv, ca.cg) = (ckv, cg);
        ca.e = vec![0.0f32; n_e * dim];
        for (w, e) in ca.e.chunks_mut(dim).enumerate() {
            pool_entry(co, w, (&ca.ckv, &ca.cg), 0, e);
        }
        let (out, rstd) = self.v4_comp_finish(co, &ca.e, 0, rope);
        ca.rstd = rstd;
        out
    }

    /// Backward of [`Model::v4_compress_projected`]: from `dc = dL/d(entries)` into `dx` (added) and the
    /// compressor's parameter gradients.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn v4_compress_backward(
        &self,
        co: &CompressorOffsets,
        x: &[f32],
        rope: &V4Rope,
        ca: &CompActs,
        dc: &[f32],
        dx: &mut [f32],
        grads: &mut [f32],
    ) {
        let c = &self.cfg;
        let dm = c.d_model;
        let t = x.len() / dm;
        let (dim, m) = (co.dim, co.ratio);
        let cw = if co.overlap { 2 * dim } else { dim };
        let n_e = t / m;
        if n_e == 0 {
            return;
        }
        // Rope and norm.
        let mut dn = dc.to_vec();
        let mut cs = vec![0.0f32; rope.table_len()];
        for (w, row) in dn.chunks_mut(dim).enumerate() {
            rope.table(w * m, &mut cs);
            V4Rope::rotate(&cs, row, dim, true);
        }
        let mut de = vec![0.0f32; n_e * dim];
        let (nw, nd) = (self.w(co.norm, dim), co.norm..co.norm + dim);
        rmsnorm::backward(
            &mut de,
            &mut grads[nd],
            &dn,
            &ca.e,
            nw,
            &ca.rstd,
            dim,
            false,
        );
        // Pooling: value and logit gradients of every slot.
        let mut dkv = vec![0.0f32; t * cw];
        let mut dg = vec![0.0f32; t * cw];
        let mx_of = |w: usize, ch: usize| {
            pool_slots(co, w, ch).fold(f32::NEG_INFINITY, |acc, (tau, col)| {
                acc.max(ca.cg[tau * cw + col])
            })
        };
        for w in 0..n_e {
            for ch in 0..dim {
                let mx = mx_of(w, ch);
                let den: f32 = pool_slots(co, w, ch)
                    .map(|(tau, col)| (ca.cg[tau * cw + col] - mx).exp())
                    .sum();
                let (e, g) = (ca.e[w * dim + ch], de[w * dim + ch]);
                for (tau, col) in pool_slots(co, w, ch) {
                    let i = tau * cw + col;
                    let alpha = (ca.cg[i] - mx).exp() / den;
                    dkv[i] += alpha * g;
                    dg[i] += alpha * (ca.ckv[i] - e) * g;
                }
            }
        }
        let ape = co.ape;
        for (tau, row) in dg.chunks(cw).enumerate() {
            let j = tau % m;
            grads[ape + j * cw..ape + (j + 1) * cw]
                .iter_mut()
                .zip(row)
                .for_each(|(a, b)| *a += b);
        }
        let (wk, wg) = (co.wkv..co.wkv + cw * dm, co.wgate..co.wgate + cw * dm);
        linear_backward(
            Some((&mut *dx, true)),
            &mut grads[wk],
            &dkv,
            x,
            self.w(co.wkv, cw * dm),
            t,
            dm,
            cw,
        );
        linear_backward(
            Some((dx, true)),
            &mut grads[wg],
            &dg,
            x,
            self.w(co.wgate, cw * dm),
            t,
            dm,
            cw,
        );
    }

    /// The CSA indexer's queries `qᴵ` (not yet roped) `[n, Hi·di]` and head weights `ω`
    /// `[n, Hi]` of rows `x: [n, D]` with their q residuals `q_res: [n, Q]`.
    pub(super) fn v4_index_queries(
        &self,
        io: &IndexerV4Offsets,
        x: &[f32],
        q_res: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let c = &self.cfg;
        let v = c.v4.as_ref().expect("a DeepSeek-V4 config");
        let (dm, ql) = (c.d_model, v.q_lora_rank);
        let (hi, di) = (v.index_n_heads, v.index_head_dim);
        let t = x.len() / dm;
        let mut qi = vec![0.0f32; t * hi * di];
        // `lin` on `Plan::F32`: f32, or a packed-only model's mapped FP8/BF16 weights.
        use super::decode::profile::QKV;
        self.lin(
            &Plan::F32,
            QKV,
            &mut qi,
            q_res,
            io.wq_b,
            t,
            ql,
            hi * di,
            false,
        );
        let mut wts = vec![0.0f32; t * hi];
        self.lin(
            &Plan::F32,
            QKV,
            &mut wts,
            x,
            io.weights_proj,
            t,
            dm,
            hi,
            false,
        );
        (qi, wts)
    }

    /// The entries query `tq` attends on a CSA layer: all `visible` ones while at most
    /// `index_topk` are, else the `index_topk` best by
    /// `I[w] = Σ_h ω[h]·ReLU(qᴵ[h]·Kᴵ[w])/√(Hi·dᴵ)`, ascending (`qi: [Hi·di]` is roped here).
    /// Ties are broken as `torch.topk` breaks them on the row transformers builds: the
    /// scores of all `total` entries of the forward, the not-yet-visible ones at −∞
    /// ([`torch_topk_visible`]). The full forward passes the entries of the whole sequence (as
    /// transformers' full forward); the cached drivers pass `visible` (as transformers'
    /// one-token decoding), so that their result does not depend on how a prompt is
    /// chunked. Only exact ties at the k-th place tell the two apart (docs/deepseek-v4.md).
    pub(super) fn v4_topk(
        &self,
        rope: &V4Rope,
        tq: usize,
        (qi, wts): (&mut [f32], &[f32]),
        keys: &[f32],
        (visible, total): (usize, usize),
    ) -> Vec<usize> {
        let v = self.cfg.v4.as_ref().expect("a DeepSeek-V4 config");
        let (di, k) = (v.index_head_dim, v.index_topk);
        if visible <= k {
            return (0..visible).collect();
        }
        if k == 0 {
            return Vec::new();
        }
        rope.rotate_at(tq, qi, di, false);
        self.official_index_query(qi);
        let qi = &*qi;
        let score = |w: usize| index_score(qi, wts, &keys[w * di..(w + 1) * di]);
        // Long contexts (one decoding query over many entries): score in parallel chunks.
        let scores: Vec<f32> = if visible >= 4096 {
            (0..visible)
                .into_par_iter()
                .with_min_len(1024)
                .map(score)
                .collect()
        } else {
            (0..visible).map(score).collect()
        };
        torch_topk_visible(&scores, k, total)
    }

    /// The CSA indexer's selection for one sequence: per query `t`, the visible entries it
    /// attends (all of them while at most `index_topk` are visible).
    fn v4_select(
        &self,
        io: &IndexerV4Offsets,
        (kproj, (mut qi, wts)): IndexProj,
        rope: &V4Rope,
    ) -> Vec<Vec<usize>> {
        let v = self.cfg.v4.as_ref().expect("a DeepSeek-V4 config");
        let (hi, di) = (v.index_n_heads, v.index_head_dim);
        let m = io.comp.ratio;
        let keys = self.v4_compress_projected(&io.comp, kproj, rope, &mut CompActs::default());
        let total = keys.len() / di;
        qi.chunks_mut(hi * di)
            .zip(wts.chunks(hi))
            .enumerate()
            .map(|(tq, (q, w))| self.v4_topk(rope, tq, (q, w), &keys, ((tq + 1) / m, total)))
            .collect()
    }

    /// The keys of query `tq` of one sequence: its window rows (`kvs`: the K = V rows of
    /// positions `base..`), then its visible entries (CSA: `sel`, the selected ones).
    pub(super) fn v4_keys<'k>(
        &self,
        vo: &V4AttnOffsets,
        tq: usize,
        (kvs, base): (&'k [f32], usize),
        entries: &'k [f32],
        sel: Option<&[usize]>,
    ) -> Vec<(bool, usize, &'k [f32])> {
        let v = self.cfg.v4.as_ref().expect("a DeepSeek-V4 config");
        let d = self.cfg.head_dim;
        let lo = (tq + 1).saturating_sub(v.sliding_window);
        let mut keys: Vec<(bool, usize, &[f32])> = (lo..=tq)
            .map(|s| (false, s, &kvs[(s - base) * d..(s - base + 1) * d]))
            .collect();
        if let Some(co) = &vo.compressor {
            let visible = (tq + 1) / co.ratio;
            let ent = |w: usize| (true, w, &entries[w * d..(w + 1) * d]);
            match sel {
                Some(sel) => keys.extend(sel.iter().map(|&w| ent(w))),
                None => keys.extend((0..visible).map(ent)),
            }
        }
        keys
    }

    /// One query row's attention output `orow: [H·d]` (inverse-roped) from its queries
    /// `qrow: [H·d]` at position `tq` over its keys (see [`Model::v4_keys`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn v4_attend_row(
        &self,
        vo: &V4AttnOffsets,
        rope: &V4Rope,
        tq: usize,
        qrow: &[f32],
        kvs: (&[f32], usize),
        entries: &[f32],
        sel: Option<&[usize]>,
        orow: &mut [f32],
    ) {
        let (h, d) = (self.cfg.n_heads, self.cfg.head_dim);
        let sinks = self.w(vo.sink, h);
        let scale = (d as f32).powf(-0.5);
        let keys = self.v4_keys(vo, tq, kvs, entries, sel);
        let mut p = vec![0.0f32; keys.len()];
        for hh in 0..h {
            let qh = &qrow[hh * d..(hh + 1) * d];
            let den = probs(qh, &keys, sinks[hh], scale, &mut p);
            let oh = &mut orow[hh * d..(hh + 1) * d];
            oh.fill(0.0);
            for (pi, k) in p.iter().zip(&keys) {
                axpy(oh, pi / den, k.2);
            }
        }
        let mut cs = vec![0.0f32; rope.table_len()];
        rope.table(tq, &mut cs);
        V4Rope::rotate(&cs, orow, d, true);
    }

    /// The DeepSeek-V4 attention of layer `l` on its normed rows `a: [N, D]`: writes (`acc`:
    /// adds) its output into `out: [N, D]` (module docs). `kv`: a training batch `[b, t]`
    /// (activations kept in `acts` for the backward pass), or cached rows that attend to their
    /// sequences' caches (module [`super::attention_v4_cache`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn v4_attention_forward(
        &self,
        l: usize,
        vo: &V4AttnOffsets,
        a: &[f32],
        kv: &mut Kv,
        plan: &Plan,
        acts: &mut V4Acts,
        out: &mut [f32],
        acc: bool,
    ) {
        use super::decode::profile::{QKV, WO};
        let c = &self.cfg;
        let v = c.v4.as_ref().expect("a DeepSeek-V4 config");
        let (dm, h, d, eps) = (c.d_model, c.n_heads, c.head_dim, c.norm_eps);
        let (ql, g, rl) = (v.q_lora_rank, v.o_groups, v.o_lora_rank);
        let n = a.len() / dm;
        // Each row's position.
        let pos: Vec<usize> = match kv {
            Kv::Batch { t, .. } => (0..n).map(|r| r % *t).collect(),
            Kv::Cache(spans) => spans.iter().flat_map(|sp| sp.p0..sp.p0 + sp.n).collect(),
        };
        let rope = self.v4_rope(l);
        let r = v.qk_rope_head_dim;
        let z = |len: usize| vec![0.0f32; len];
        // Queries.
        acts.qa = z(n * ql);
        self.lin(plan, QKV, &mut acts.qa, a, vo.wq_a, n, dm, ql, false);
        acts.q_res = z(n * ql);
        acts.qa_rstd = z(n);
        rmsnorm::forward(
            &mut acts.q_res,
            &mut acts.qa_rstd,
            &acts.qa,
            self.w(vo.q_norm, ql),
            ql,
            eps,
        );
        acts.qf = z(n * h * d);
        self.lin(
            plan,
            QKV,
            &mut acts.qf,
            &acts.q_res,
            vo.wq_b,
            n,
            ql,
            h * d,
            false,
        );
        acts.q = acts.qf.clone();
        acts.qf_rstd = urms(&mut acts.q, d, eps);
        // The single K = V head.
        acts.kv0 = z(n * d);
        self.lin(plan, QKV, &mut acts.kv0, a, vo.wkv, n, dm, d, false);
        acts.kv = z(n * d);
        acts.kv_rstd = z(n);
        rmsnorm::forward(
            &mut acts.kv,
            &mut acts.kv_rstd,
            &acts.kv0,
            self.w(vo.kv_norm, d),
            d,
            eps,
        );
        acts.q
            .par_chunks_mut(h * d)
            .zip(acts.kv.par_chunks_mut(d))
            .enumerate()
            .for_each(|(row, (qr, kr))| {
                let mut cs = vec![0.0f32; r];
                rope.table(pos[row], &mut cs);
                V4Rope::rotate(&cs, qr, d, false);
                V4Rope::rotate(&cs, kr, d, false);
            });
        self.official_kv(&mut acts.kv);
        acts.o = z(n * h * d);
        match kv {
            Kv::Batch { b, t, dsa } => {
                self.v4_attend_batch(vo, &rope, a, (*b, *t), dsa.as_deref_mut(), acts)
            }
            Kv::Cache(spans) => {
                let t0 = super::decode::profile::start();
                for sp in spans.iter_mut() {
                    self.v4_attend_cached(l, vo, &rope, a, sp, acts);
                }
                super::decode::profile::stop(super::decode::profile::ATTN, t0);
            }
        }
        // Grouped low-rank output: z[:, γ] = o[:, γ]·Wo_a[γ]ᵀ, out (+)= z·Wo_bᵀ.
        let gw = h * d / g;
        acts.z = z(n * g * rl);
        let mut og = z(n * gw);
        let mut zg = z(n * rl);
        for gi in 0..g {
            gather_cols(&mut og, &acts.o, h * d, gi * gw);
            self.lin(
                plan,
                WO,
                &mut zg,
                &og,
                vo.wo_a + gi * rl * gw,
                n,
                gw,
                rl,
                false,
            );
            scatter_cols(&mut acts.z, &zg, g * rl, gi * rl);
        }
        self.lin(plan, WO, out, &acts.z, vo.wo_b, n, g * rl, dm, acc);
    }

    /// The attention core of a training batch `[b, t]`: per sequence its compressed entries
    /// and (CSA) selection, then every row over its window and entries, into `acts.o`. With a
    /// DSA training stage (`db`): dense and warm-up stages attend to every visible entry, and
    /// the indexer's KL loss (and recall) is measured (module [`super::attention_v4_indexer`]).
    fn v4_attend_batch(
        &self,
        vo: &V4AttnOffsets,
        rope: &V4Rope,
        a: &[f32],
        (b, t): (usize, usize),
        mut db: Option<&mut super::attention::DsaBatch>,
        acts: &mut V4Acts,
    ) {
        let c = &self.cfg;
        let (h, d) = (c.n_heads, c.head_dim);
        let sparse = db.as_ref().is_none_or(|db| db.run.stage.is_sparse());
        let measure = db.as_ref().is_some_and(|db| db.run.kl || db.run.recall);
        let run = db.as_ref().map(|db| db.run);
        let norm = self.v4_index_norm(b * t);
        // The sequences are independent: one task per sequence (compressor, indexer, its
        // rows, its indexer loss), so that the small per-sequence products and the serial
        // pooling and selection loops of different sequences run side by side instead of
        // each product being split (or not) across the pool. Every sequence computes what it
        // computed alone, and the loss sums are added in sequence order: the same bits.
        use super::attention_v4_indexer::IndexActs;
        type Seq = (
            Vec<f32>,
            CompActs,
            Option<Vec<Vec<usize>>>,
            Option<IndexActs>,
            (f64, f64),
        );
        let (q_all, kv_all) = (&acts.q, &acts.kv);
        let (q_res_all, o_all) = (&acts.q_res, &mut acts.o);
        // The row-wise projections of every sequence at once: one product per weight (the
        // weights are packed once, not once per sequence); each row's values are those of its
        // sequence's own product.
        let comp = vo
            .compressor
            .as_ref()
            .map(|co| (co.width(), self.v4_comp_project_seqs(co, a, t)));
        let index = vo.indexer.as_ref().map(|io| {
            (
                io.comp.width(),
                self.v4_comp_project_seqs(&io.comp, a, t),
                self.v4_index_queries(io, a, q_res_all),
            )
        });
        let v = c.v4.as_ref().expect("a DeepSeek-V4 config");
        let (hi, di) = (v.index_n_heads, v.index_head_dim);
        let rows_of = |all: &[f32], s: usize, w: usize| all[s * t * w..(s + 1) * t * w].to_vec();
        let seqs: Vec<Seq> = o_all
            .par_chunks_mut(t * h * d)
            .enumerate()
            .map(|(s, o)| {
                let rows = s * t..(s + 1) * t;
                let mut ca = CompActs::default();
                let entries = match (&vo.compressor, &comp) {
                    (Some(co), Some((cw, (ckv, cg)))) => {
                        let proj = (rows_of(ckv, s, *cw), rows_of(cg, s, *cw));
                        self.v4_compress_projected(co, proj, rope, &mut ca)
                    }
                    _ => Vec::new(),
                };
                let (mut sel, mut ia_s) = (None, None);
                if let (Some(io), Some((cw, (ckv, cg), (qi, wts)))) = (&vo.indexer, &index) {
                    let proj = (
                        (rows_of(ckv, s, *cw), rows_of(cg, s, *cw)),
                        (rows_of(qi, s, hi * di), rows_of(wts, s, hi)),
                    );
                    if measure {
                        let ia = self.v4_index_forward(io, rope, proj);
                        sel = sparse.then(|| ia.topk.clone());
                        ia_s = Some(ia);
                    } else {
                        sel = sparse.then(|| self.v4_select(io, proj, rope));
                    }
                }
                let kvs = &kv_all[rows.start * d..rows.end * d];
                let qs = &q_all[rows.start * h * d..rows.end * h * d];
                o.par_chunks_mut(h * d).enumerate().for_each(|(tq, orow)| {
                    let qrow = &qs[tq * h * d..(tq + 1) * h * d];
                    let sel = sel.as_ref().map(|s: &Vec<Vec<usize>>| &s[tq][..]);
                    self.v4_attend_row(vo, rope, tq, qrow, (kvs, 0), &entries, sel, orow);
                });
                let mut loss = (0.0, 0.0);
                if let (Some(run), Some(ia)) = (run, ia_s.as_mut()) {
                    loss = self.v4_index_loss(vo, (qs, kvs), &entries, ia, run, norm);
                }
                (entries, ca, sel, ia_s, loss)
            })
            .collect();
        acts.comp = Vec::with_capacity(b);
        acts.entries = Vec::with_capacity(b);
        acts.sel = Vec::with_capacity(b);
        acts.index = Vec::new();
        for (entries, comp, sel, index, (kl, recall)) in seqs {
            acts.entries.push(entries);
            acts.comp.push(comp);
            acts.sel.push(sel);
            if let Some(ia) = index {
                acts.index.push(ia);
                if let Some(db) = db.as_deref_mut() {
                    db.kl += kl;
                    db.recall += recall;
                }
            }
        }
    }

    /// Backward of [`Model::v4_attention_forward`]: from `dout = dL/dout` into `da = dL/da`
    /// (overwritten), accumulating the parameter gradients (none for the indexer, whose
    /// top-k is a set of integers: docs/deepseek-v4-equations.md §5.9).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn v4_attention_backward(
        &self,
        l: usize,
        vo: &V4AttnOffsets,
        a: &[f32],
        (b, t): (usize, usize),
        acts: &V4Acts,
        (dout, da): (&[f32], &mut [f32]),
        grads: &mut [f32],
    ) {
        let c = &self.cfg;
        let v = c.v4.as_ref().expect("a DeepSeek-V4 config");
        let (dm, h, d) = (c.d_model, c.n_heads, c.head_dim);
        let (ql, g, rl) = (v.q_lora_rank, v.o_groups, v.o_lora_rank);
        let n = b * t;
        let rope = self.v4_rope(l);
        let r = v.qk_rope_head_dim;
        let z = |len: usize| vec![0.0f32; len];
        let rg = |o: usize, len: usize| o..o + len;
        // out = z·Wo_bᵀ.
        let mut dz = z(n * g * rl);
        let wob = self.w(vo.wo_b, dm * g * rl);
        linear_backward(
            Some((&mut dz, false)),
            &mut grads[rg(vo.wo_b, dm * g * rl)],
            dout,
            &acts.z,
            wob,
            n,
            g * rl,
            dm,
        );
        // z[:, γ] = o[:, γ]·Wo_a[γ]ᵀ.
        let gw = h * d / g;
        let mut dob = z(n * h * d);
        let (mut og, mut dzg, mut dog) = (z(n * gw), z(n * rl), z(n * gw));
        for gi in 0..g {
            gather_cols(&mut og, &acts.o, h * d, gi * gw);
            gather_cols(&mut dzg, &dz, g * rl, gi * rl);
            let off = vo.wo_a + gi * rl * gw;
            linear_backward(
                Some((&mut dog, false)),
                &mut grads[rg(off, rl * gw)],
                &dzg,
                &og,
                self.w(off, rl * gw),
                n,
                gw,
                rl,
            );
            scatter_cols(&mut dob, &dog, h * d, gi * gw);
        }
        // o = rope⁻¹(o_pre): its transpose is the forward rotation.
        dob.par_chunks_mut(h * d)
            .enumerate()
            .for_each(|(row, orow)| {
                let mut cs = vec![0.0f32; r];
                rope.table(row % t, &mut cs);
                V4Rope::rotate(&cs, orow, d, false);
            });
        // Attention core: one task per (sequence, head), each with its own dq rows, K = V row
        // and entry gradients and sink gradient, added in task order (deterministic).
        let sinks = self.w(vo.sink, h);
        let scale = (d as f32).powf(-0.5);
        let tasks: Vec<(usize, usize)> =
            (0..b).flat_map(|s| (0..h).map(move |hh| (s, hh))).collect();
        // (dq rows [t, d], K = V row gradients [t, d], entry gradients, sink gradient)
        type Part = (Vec<f32>, Vec<f32>, Vec<f32>, f32);
        let parts: Vec<Part> = tasks
            .par_iter()
            .map(|&(s, hh)| {
                let rows = s * t..(s + 1) * t;
                let kvs = &acts.kv[rows.start * d..rows.end * d];
                let qs = &acts.q[rows.start * h * d..rows.end * h * d];
                let (entries, sel) = (&acts.entries[s], acts.sel[s].as_ref());
                let (mut dqs, mut dkvs) = (z(t * d), z(t * d));
                let mut de = z(entries.len());
                let mut dsink = 0.0f32;
                let (mut p, mut gam) = (Vec::new(), Vec::new());
                for tq in 0..t {
                    let keys = self.v4_keys(vo, tq, (kvs, 0), entries, sel.map(|s| &s[tq][..]));
                    p.resize(keys.len(), 0.0);
                    let qh = &qs[(tq * h + hh) * d..(tq * h + hh + 1) * d];
                    let den = probs(qh, &keys, sinks[hh], scale, &mut p);
                    p.iter_mut().for_each(|x| *x /= den);
                    let p_sink = 1.0 - p.iter().sum::<f32>();
                    let row = (rows.start + tq) * h + hh;
                    let go = &dob[row * d..(row + 1) * d];
                    gam.clear();
                    gam.extend(keys.iter().map(|k| dot(go, k.2)));
                    let mu: f32 = p.iter().zip(&gam).map(|(x, y)| x * y).sum();
                    dsink -= p_sink * mu;
                    let dqh = &mut dqs[tq * d..(tq + 1) * d];
                    for ((pi, gi), k) in p.iter().zip(&gam).zip(&keys) {
                        let dl = pi * (gi - mu);
                        axpy(dqh, scale * dl, k.2);
                        let dst = if k.0 {
                            &mut de[k.1 * d..(k.1 + 1) * d]
                        } else {
                            &mut dkvs[k.1 * d..(k.1 + 1) * d]
                        };
                        axpy(dst, *pi, go);
                        axpy(dst, scale * dl, qh);
                    }
                }
                (dqs, dkvs, de, dsink)
            })
            .collect();
        let mut dq = z(n * h * d);
        let mut dkv = z(n * d);
        let mut dsink = vec![0.0f32; h];
        let mut dent: Vec<Vec<f32>> = acts.entries.iter().map(|e| vec![0.0f32; e.len()]).collect();
        for (&(s, hh), (dqs, dkvs, de, ds)) in tasks.iter().zip(&parts) {
            for (tq, g) in dqs.chunks(d).enumerate() {
                let row = (s * t + tq) * h + hh;
                dq[row * d..(row + 1) * d].copy_from_slice(g);
            }
            let dst = &mut dkv[s * t * d..(s + 1) * t * d];
            dst.iter_mut().zip(dkvs).for_each(|(x, y)| *x += y);
            dent[s].iter_mut().zip(de).for_each(|(x, y)| *x += y);
            dsink[hh] += ds;
        }
        grads[rg(vo.sink, h)]
            .iter_mut()
            .zip(&dsink)
            .for_each(|(x, y)| *x += y);
        // q = rope(urms(q_res·Wq_bᵀ)), per head.
        dq.par_chunks_mut(h * d)
            .zip(acts.qf.par_chunks(h * d))
            .zip(acts.qf_rstd.par_chunks(h))
            .enumerate()
            .for_each(|(row, ((dr, xr), rr))| {
                let mut cs = vec![0.0f32; r];
                rope.table(row % t, &mut cs);
                V4Rope::rotate(&cs, dr, d, true);
                for ((u, x), &rs) in dr.chunks_mut(d).zip(xr.chunks(d)).zip(rr) {
                    let ux: f32 = dot(u, x);
                    let k = rs * rs * rs * ux / d as f32;
                    u.iter_mut()
                        .zip(x)
                        .for_each(|(ui, xi)| *ui = rs * *ui - xi * k);
                }
            });
        let mut dqres = z(n * ql);
        linear_backward(
            Some((&mut dqres, false)),
            &mut grads[rg(vo.wq_b, h * d * ql)],
            &dq,
            &acts.q_res,
            self.w(vo.wq_b, h * d * ql),
            n,
            ql,
            h * d,
        );
        let (q_norm, q_pre) = ((vo.q_norm, &acts.qa[..], &acts.qa_rstd[..]), (vo.wq_a, ql));
        self.norm_proj_backward(&dqres, q_norm, q_pre, a, (da, false), grads);
        // kv = rope(rms(a·Wkvᵀ; kv_norm)).
        dkv.par_chunks_mut(d).enumerate().for_each(|(row, dr)| {
            let mut cs = vec![0.0f32; r];
            rope.table(row % t, &mut cs);
            V4Rope::rotate(&cs, dr, d, true);
        });
        let (kv_norm, kv_pre) = ((vo.kv_norm, &acts.kv0[..], &acts.kv_rstd[..]), (vo.wkv, d));
        self.norm_proj_backward(&dkv, kv_norm, kv_pre, a, (da, true), grads);
        // The compressed entries.
        if let Some(co) = &vo.compressor {
            for (s, (ca, dc)) in acts.comp.iter().zip(&dent).enumerate() {
                let rows = s * t..(s + 1) * t;
                let xs = &a[rows.start * dm..rows.end * dm];
                let mut dxs = z(t * dm);
                self.v4_compress_backward(co, xs, &rope, ca, dc, &mut dxs, grads);
                da[rows.start * dm..rows.end * dm]
                    .iter_mut()
                    .zip(&dxs)
                    .for_each(|(x, y)| *x += y);
            }
        }
    }
}

impl Model {
    /// Backward of `y = rms(a·Wᵀ; w_norm)`: from `dy` into `da` (added when `acc`), with the
    /// norm weight's (`norm`: its offset, the pre-norm rows, their `1/rms`) and the
    /// projection's (`proj`: its offset and output width) gradients.
    #[allow(clippy::type_complexity)]
    fn norm_proj_backward(
        &self,
        dy: &[f32],
        (norm, pre, rstd): (usize, &[f32], &[f32]),
        (proj, width): (usize, usize),
        a: &[f32],
        (da, acc): (&mut [f32], bool),
        grads: &mut [f32],
    ) {
        let dm = self.cfg.d_model;
        let n = a.len() / dm;
        let mut dpre = vec![0.0f32; n * width];
        let (w, dw) = (self.w(norm, width), norm..norm + width);
        rmsnorm::backward(&mut dpre, &mut grads[dw], dy, pre, w, rstd, width, false);
        let (wp, dwp) = (self.w(proj, width * dm), proj..proj + width * dm);
        linear_backward(Some((da, acc)), &mut grads[dwp], &dpre, a, wp, n, dm, width);
    }
}

/// `dst: [N, w]` ← the columns `c0..c0 + w` of `src: [N, width]` (one output group).
fn gather_cols(dst: &mut [f32], src: &[f32], width: usize, c0: usize) {
    let w = dst.len() / (src.len() / width);
    for (d, s) in dst.chunks_mut(w).zip(src.chunks(width)) {
        d.copy_from_slice(&s[c0..c0 + w]);
    }
}

/// The columns `c0..c0 + w` of `dst: [N, width]` ← `src: [N, w]`.
fn scatter_cols(dst: &mut [f32], src: &[f32], width: usize, c0: usize) {
    let w = src.len() / (dst.len() / width);
    for (d, s) in dst.chunks_mut(width).zip(src.chunks(w)) {
        d[c0..c0 + w].copy_from_slice(s);
    }
}

/// One sequence's indexer projections: its compressor's values and logits `[t, cw]` each
/// (position bias added), then its queries `[t, Hi·dᴵ]` (not yet roped) and head weights
/// `[t, Hi]` ([`Model::v4_index_queries`]).
pub(super) type IndexProj = ((Vec<f32>, Vec<f32>), (Vec<f32>, Vec<f32>));

/// The indexer's score of one entry key `kw: [dᴵ]` for a query `qi: [Hi·dᴵ]` (roped) with head
/// weights `wts: [Hi]`: `Σ_h ω_h·Hi^-½·ReLU(qᴵ_h·kw)·dᴵ^-½`.
pub(super) fn index_score(qi: &[f32], wts: &[f32], kw: &[f32]) -> f32 {
    let (hi, di) = (wts.len(), kw.len());
    let (ws, ss) = ((hi as f32).powf(-0.5), (di as f32).powf(-0.5));
    (0..hi)
        .map(|h| wts[h] * ws * dot(&qi[h * di..(h + 1) * di], kw).max(0.0) * ss)
        .sum()
}

/// Unnormalised attention weights of query `q` over `keys` with the sink as an extra logit:
/// `p[s] = e^{ℓ_s − M}` (`ℓ_s = q·k_s·scale`, `M` the max over the scores and the sink);
/// returns the denominator `Σ p + e^{sink − M}`.
pub(super) fn probs(
    q: &[f32],
    keys: &[(bool, usize, &[f32])],
    sink: f32,
    scale: f32,
    p: &mut [f32],
) -> f32 {
    for (pi, k) in p.iter_mut().zip(keys) {
        *pi = dot(q, k.2) * scale;
    }
    let mx = p.iter().fold(sink, |acc, &x| acc.max(x));
    (sink - mx).exp() + crate::kernels::vexp::exp_sub_sum(p, mx)
}
