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

use super::layout::LayoutBuilder;
use super::Model;
use crate::config::{ModelConfig, V4Config, V4LayerType};
use crate::kernels::matmul::linear_forward;
use crate::kernels::rmsnorm;
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
    overlap: bool,
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
        let compressor = (m > 0).then(|| add_compressor(bld, &p("compressor"), dm, d, m, csa));
        let indexer = csa.then(|| {
            let (hi, di) = (v.index_n_heads, v.index_head_dim);
            IndexerV4Offsets {
                comp: add_compressor(bld, &p("indexer.compressor"), dm, di, m, true),
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

/// Partial interleaved RoPE on the last `r` channels (`docs/deepseek-v4-equations.md` §1.4,
/// §3.1): `inv_freq[i] = θ^(−2i/r)` (YaRN-blended for compressed layers), cos and sin of
/// `f32(p)·inv_freq[i]` scaled by the attention factor.
#[derive(Clone, Debug)]
pub struct V4Rope {
    inv_freq: Vec<f32>,
    scale: f32,
}

impl V4Rope {
    /// The rope of the sliding layers (`rope_theta`, no scaling).
    pub fn main(c: &ModelConfig, r: usize) -> Self {
        Self::new(c.rope_theta, r, None)
    }

    /// The rope of the compressed layers.
    pub fn compress(v: &V4Config, r: usize) -> Self {
        Self::new(v.compress_rope_theta, r, v.compress_rope_scaling.as_ref())
    }

    fn new(theta: f64, r: usize, yarn: Option<&crate::config::V4Yarn>) -> Self {
        let half = r / 2;
        let mut inv: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / r as f64))
            .collect();
        let mut scale = 1.0;
        if let Some(y) = yarn {
            let corr = |nu: f64| {
                r as f64
                    * (y.original_max_position_embeddings as f64
                        / (2.0 * std::f64::consts::PI * nu))
                        .ln()
                    / (2.0 * theta.ln())
            };
            let lo = corr(y.beta_fast).floor().max(0.0);
            let mut hi = corr(y.beta_slow).ceil().min(r as f64 - 1.0);
            if lo == hi {
                hi += 0.001;
            }
            for (i, f) in inv.iter_mut().enumerate() {
                let ramp = ((i as f64 - lo) / (hi - lo)).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                *f = *f / y.factor * (1.0 - keep) + *f * keep;
            }
            scale = y.attention_factor;
        }
        V4Rope {
            inv_freq: inv.iter().map(|&f| f as f32).collect(),
            scale: scale as f32,
        }
    }

    /// `(cos, sin)` of every pair at position `p`, into `cs: [r]` (cos at `2i`, sin at `2i+1`).
    fn table(&self, p: usize, cs: &mut [f32]) {
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let a = p as f32 * f;
            cs[2 * i] = a.cos() * self.scale;
            cs[2 * i + 1] = a.sin() * self.scale;
        }
    }

    /// Rotate the last `r` channels of every `c`-wide vector in `x` by the table `cs`
    /// (`inverse`: by `−sin`).
    fn rotate(cs: &[f32], x: &mut [f32], c: usize, inverse: bool) {
        let r = cs.len();
        for v in x.chunks_mut(c) {
            let tail = &mut v[c - r..];
            for i in 0..r / 2 {
                let (cos, sin) = (
                    cs[2 * i],
                    if inverse {
                        -cs[2 * i + 1]
                    } else {
                        cs[2 * i + 1]
                    },
                );
                let (u, w) = (tail[2 * i], tail[2 * i + 1]);
                tail[2 * i] = u * cos - w * sin;
                tail[2 * i + 1] = u * sin + w * cos;
            }
        }
    }
}

/// `x / √(mean(x²) + ε)` over each `c`-wide vector, in place.
fn urms(x: &mut [f32], c: usize, eps: f32) {
    for v in x.chunks_mut(c) {
        let ms = v.iter().map(|&u| u * u).sum::<f32>() / c as f32;
        let s = 1.0 / (ms + eps).sqrt();
        v.iter_mut().for_each(|u| *u *= s);
    }
}

impl Model {
    /// The rope of layer `l` of a DeepSeek-V4 model.
    fn v4_rope(&self, l: usize) -> V4Rope {
        let v = self.cfg.v4.as_ref().expect("a DeepSeek-V4 config");
        match v.layer_types[l] {
            V4LayerType::SlidingAttention => V4Rope::main(&self.cfg, v.qk_rope_head_dim),
            _ => V4Rope::compress(v, v.qk_rope_head_dim),
        }
    }

    /// The compressed entries `[⌊t/m⌋, dim]` of one sequence `x: [t, D]` (§3.6, §3.7).
    fn v4_compress(&self, co: &CompressorOffsets, x: &[f32], rope: &V4Rope) -> Vec<f32> {
        let c = &self.cfg;
        let dm = c.d_model;
        let t = x.len() / dm;
        let (dim, m) = (co.dim, co.ratio);
        let cw = if co.overlap { 2 * dim } else { dim };
        let n_e = t / m;
        if n_e == 0 {
            return Vec::new();
        }
        let mut ckv = vec![0.0f32; t * cw];
        let mut cg = vec![0.0f32; t * cw];
        linear_forward(&mut ckv, x, self.w(co.wkv, cw * dm), t, dm, cw, false);
        linear_forward(&mut cg, x, self.w(co.wgate, cw * dm), t, dm, cw, false);
        let ape = self.w(co.ape, m * cw);
        for (tau, row) in cg.chunks_mut(cw).enumerate() {
            let j = tau % m;
            row.iter_mut()
                .zip(&ape[j * cw..(j + 1) * cw])
                .for_each(|(g, b)| *g += b);
        }
        let mut e = vec![0.0f32; n_e * dim];
        let mut slots: Vec<(f32, f32)> = Vec::with_capacity(2 * m);
        for w in 0..n_e {
            for ch in 0..dim {
                slots.clear();
                if co.overlap {
                    if w >= 1 {
                        for j in 0..m {
                            let tau = (w - 1) * m + j;
                            slots.push((cg[tau * cw + ch], ckv[tau * cw + ch]));
                        }
                    }
                    for j in 0..m {
                        let tau = w * m + j;
                        slots.push((cg[tau * cw + dim + ch], ckv[tau * cw + dim + ch]));
                    }
                } else {
                    for j in 0..m {
                        let tau = w * m + j;
                        slots.push((cg[tau * cw + ch], ckv[tau * cw + ch]));
                    }
                }
                let mx = slots.iter().fold(f32::NEG_INFINITY, |a, s| a.max(s.0));
                let (mut den, mut num) = (0.0f32, 0.0f32);
                for &(z, v) in &slots {
                    let p = (z - mx).exp();
                    den += p;
                    num += p * v;
                }
                e[w * dim + ch] = num / den;
            }
        }
        let mut out = vec![0.0f32; n_e * dim];
        let mut rstd = vec![0.0f32; n_e];
        rmsnorm::forward(
            &mut out,
            &mut rstd,
            &e,
            self.w(co.norm, dim),
            dim,
            c.norm_eps,
        );
        let mut cs = vec![0.0f32; rope.inv_freq.len() * 2];
        for (w, row) in out.chunks_mut(dim).enumerate() {
            rope.table(w * m, &mut cs);
            V4Rope::rotate(&cs, row, dim, false);
        }
        out
    }

    /// The CSA indexer's selection for one sequence: per query `t`, the visible entries it
    /// attends (all of them while at most `index_topk` are visible).
    fn v4_select(
        &self,
        io: &IndexerV4Offsets,
        x: &[f32],
        q_res: &[f32],
        rope: &V4Rope,
    ) -> Vec<Vec<usize>> {
        let c = &self.cfg;
        let v = c.v4.as_ref().expect("a DeepSeek-V4 config");
        let (dm, ql) = (c.d_model, v.q_lora_rank);
        let (hi, di, k) = (v.index_n_heads, v.index_head_dim, v.index_topk);
        let t = x.len() / dm;
        let m = io.comp.ratio;
        let keys = self.v4_compress(&io.comp, x, rope);
        let mut qi = vec![0.0f32; t * hi * di];
        linear_forward(
            &mut qi,
            q_res,
            self.w(io.wq_b, hi * di * ql),
            t,
            ql,
            hi * di,
            false,
        );
        let mut wts = vec![0.0f32; t * hi];
        linear_forward(
            &mut wts,
            x,
            self.w(io.weights_proj, hi * dm),
            t,
            dm,
            hi,
            false,
        );
        let (ws, ss) = ((hi as f32).powf(-0.5), (di as f32).powf(-0.5));
        let mut cs = vec![0.0f32; rope.inv_freq.len() * 2];
        (0..t)
            .map(|tq| {
                let visible = (tq + 1) / m;
                if visible <= k {
                    return (0..visible).collect();
                }
                rope.table(tq, &mut cs);
                let q = &mut qi[tq * hi * di..(tq + 1) * hi * di];
                V4Rope::rotate(&cs, q, di, false);
                let mut scored: Vec<(f32, usize)> = (0..visible)
                    .map(|w| {
                        let kw = &keys[w * di..(w + 1) * di];
                        let s: f32 = (0..hi)
                            .map(|h| {
                                let dot: f32 = q[h * di..(h + 1) * di]
                                    .iter()
                                    .zip(kw)
                                    .map(|(a, b)| a * b)
                                    .sum();
                                wts[tq * hi + h] * ws * dot.max(0.0) * ss
                            })
                            .sum();
                        (s, w)
                    })
                    .collect();
                // Best first; ties to the lower entry (torch leaves them unspecified).
                scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let mut sel: Vec<usize> = scored[..k].iter().map(|s| s.1).collect();
                sel.sort_unstable();
                sel
            })
            .collect()
    }

    /// The DeepSeek-V4 attention of layer `l` over a batch `[b, t]`: writes (`acc`: adds) its
    /// output into `out: [N, D]` (module docs).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn v4_attention_forward(
        &self,
        l: usize,
        vo: &V4AttnOffsets,
        a: &[f32],
        (b, t): (usize, usize),
        out: &mut [f32],
        acc: bool,
    ) {
        let c = &self.cfg;
        let v = c.v4.as_ref().expect("a DeepSeek-V4 config");
        let (dm, h, d, eps) = (c.d_model, c.n_heads, c.head_dim, c.norm_eps);
        let (ql, g, rl, win) = (v.q_lora_rank, v.o_groups, v.o_lora_rank, v.sliding_window);
        let n = b * t;
        let rope = self.v4_rope(l);
        let r = v.qk_rope_head_dim;
        // Queries.
        let mut qa = vec![0.0f32; n * ql];
        linear_forward(&mut qa, a, self.w(vo.wq_a, ql * dm), n, dm, ql, false);
        let mut q_res = vec![0.0f32; n * ql];
        let mut rstd = vec![0.0f32; n];
        rmsnorm::forward(&mut q_res, &mut rstd, &qa, self.w(vo.q_norm, ql), ql, eps);
        let mut q = vec![0.0f32; n * h * d];
        linear_forward(
            &mut q,
            &q_res,
            self.w(vo.wq_b, h * d * ql),
            n,
            ql,
            h * d,
            false,
        );
        urms(&mut q, d, eps);
        // The single K = V head.
        let mut kv0 = vec![0.0f32; n * d];
        linear_forward(&mut kv0, a, self.w(vo.wkv, d * dm), n, dm, d, false);
        let mut kv = vec![0.0f32; n * d];
        rmsnorm::forward(&mut kv, &mut rstd, &kv0, self.w(vo.kv_norm, d), d, eps);
        q.par_chunks_mut(h * d)
            .zip(kv.par_chunks_mut(d))
            .enumerate()
            .for_each(|(row, (qr, kr))| {
                let mut cs = vec![0.0f32; r];
                rope.table(row % t, &mut cs);
                V4Rope::rotate(&cs, qr, d, false);
                V4Rope::rotate(&cs, kr, d, false);
            });
        let sinks = self.w(vo.sink, h);
        let scale = (d as f32).powf(-0.5);
        let mut o = vec![0.0f32; n * h * d];
        for s in 0..b {
            let rows = s * t..(s + 1) * t;
            let xs = &a[rows.start * dm..rows.end * dm];
            let entries = vo
                .compressor
                .as_ref()
                .map(|co| self.v4_compress(co, xs, &rope))
                .unwrap_or_default();
            let m = vo.compressor.map_or(1, |co| co.ratio);
            let sel = vo
                .indexer
                .as_ref()
                .map(|io| self.v4_select(io, xs, &q_res[rows.start * ql..rows.end * ql], &rope));
            let kvs = &kv[rows.start * d..rows.end * d];
            let qs = &q[rows.start * h * d..rows.end * h * d];
            o[rows.start * h * d..rows.end * h * d]
                .par_chunks_mut(h * d)
                .enumerate()
                .for_each(|(tq, orow)| {
                    let lo = (tq + 1).saturating_sub(win);
                    let mut keys: Vec<&[f32]> =
                        (lo..=tq).map(|s| &kvs[s * d..(s + 1) * d]).collect();
                    if vo.compressor.is_some() {
                        let visible = (tq + 1) / m;
                        match &sel {
                            Some(sel) => {
                                keys.extend(sel[tq].iter().map(|&w| &entries[w * d..(w + 1) * d]))
                            }
                            None => keys.extend((0..visible).map(|w| &entries[w * d..(w + 1) * d])),
                        }
                    }
                    let mut p = vec![0.0f32; keys.len()];
                    for hh in 0..h {
                        let qh = &qs[(tq * h + hh) * d..(tq * h + hh + 1) * d];
                        for (pi, k) in p.iter_mut().zip(&keys) {
                            *pi = qh.iter().zip(*k).map(|(x, y)| x * y).sum::<f32>() * scale;
                        }
                        let mx = p.iter().fold(sinks[hh], |acc, &x| acc.max(x));
                        let mut den = (sinks[hh] - mx).exp();
                        for pi in p.iter_mut() {
                            *pi = (*pi - mx).exp();
                            den += *pi;
                        }
                        let oh = &mut orow[hh * d..(hh + 1) * d];
                        oh.fill(0.0);
                        for (pi, k) in p.iter().zip(&keys) {
                            let w = pi / den;
                            oh.iter_mut().zip(*k).for_each(|(acc, x)| *acc += w * x);
                        }
                    }
                    let mut cs = vec![0.0f32; r];
                    rope.table(tq, &mut cs);
                    V4Rope::rotate(&cs, orow, d, true);
                });
        }
        // Grouped low-rank output: z[:, γ] = o[:, γ]·Wo_a[γ]ᵀ, out (+)= z·Wo_bᵀ.
        let gw = h * d / g;
        let mut z = vec![0.0f32; n * g * rl];
        let mut og = vec![0.0f32; n * gw];
        let mut zg = vec![0.0f32; n * rl];
        for gi in 0..g {
            for (dst, src) in og.chunks_mut(gw).zip(o.chunks(h * d)) {
                dst.copy_from_slice(&src[gi * gw..(gi + 1) * gw]);
            }
            let wa = self.w(vo.wo_a + gi * rl * gw, rl * gw);
            linear_forward(&mut zg, &og, wa, n, gw, rl, false);
            for (dst, src) in z.chunks_mut(g * rl).zip(zg.chunks(rl)) {
                dst[gi * rl..(gi + 1) * rl].copy_from_slice(src);
            }
        }
        linear_forward(out, &z, self.w(vo.wo_b, dm * g * rl), n, g * rl, dm, acc);
    }
}
