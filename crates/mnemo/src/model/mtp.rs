//! Multi-token prediction (MTP, DeepSeek-V4's `num_nextn_predict_layers`,
//! `docs/deepseek-v4-equations.md` §9): after the main model, block `j` of `D` predicts the
//! token `j + 2` ahead of each position from the streams of the model (or of block `j − 1`)
//! and the embedding of the token `j + 1` ahead. Trained as an auxiliary loss; at inference a
//! draft model ([`Model::mtp_logits`]). Official `inference/model.py` (`MTPBlock`), with the
//! DeepSeek-V3 index convention (the V4 code does not show the call site):
//!
//! ```text
//! H⁰ = X^L                       the main model's last streams, before its head   [N, n, D]
//! u_j[i]  = ids[i + 1 + j]       (the next token at depth 0)                      [N]
//! e       = rms(E[u_j]; enorm)                                                    [N, D]
//! Y[i, k] = e[i]·e_projᵀ + rms(H^j[i, k]; hnorm)·h_projᵀ     every stream k      [N, n, D]
//! H^{j+1} = Block_{L+j}(Y)       one full block (V4 attention over Y, MoE, its own mHC
//!                                hc_attn/hc_ffn): `block_forward` with block index L + j
//! logits_j = rms(HcHead_j(H^{j+1}); norm_j)·Woutᵀ   its own mHC head, the shared head  [N, V]
//! L_mtp   = (1/D) Σ_j mean_i CE(logits_j[i], ids[i + 2 + j])   over i + 2 + j ≤ T (the
//!           targets other than `IGNORE`)
//! loss    = L_main + λ·L_mtp     (λ = `train.mtp_weight`, `Workspace::mtp_weight`)
//! ```
//!
//! `E` and `Wout` are the main model's (shared, both receive the MTP's gradient), and so is
//! `X^L`: its gradient is the main head's plus the MTP's. Rows without a token `j + 1` ahead
//! (the last `j + 1` of each sequence) get a placeholder input (the sequence's last token) and
//! no target: causal attention keeps them out of every counted row.
//!
//! Backward, per block from the last (`dH^{j+1}` = its head's gradient + block `j + 1`'s input
//! gradient):
//!
//! ```text
//! dY          = Block_{L+j}ᵀ(dH^{j+1})                                  (`block_backward`)
//! d(e·e_projᵀ) = Σ_k dY[·, k];  de = that·e_proj;  dE[u_j] += rmsᵀ(de)   [N, D]
//! dH^j        += rmsᵀ(dY·h_proj)                                         [N, n, D]
//! ```
//!
//! Buffers: the block's streams and activations are `Workspace::streams` / `layers` entries
//! after the main model's (`workspace::block_stream`); the rest is [`MtpWs`].

use super::attention::Kv;
use super::block::{BlockRows, Mem};
use super::decode::Plan;
use super::ffn::FfnRows;
use super::residual::{NormActs, Stream};
use super::workspace::block_stream;
use super::{Model, Workspace};
use crate::config::ModelConfig;
use crate::kernels::act_quant::rounded_rows;
use crate::kernels::cross_entropy::{self, IGNORE};
use crate::kernels::matmul::{linear_backward, linear_forward};
use crate::kernels::{embedding, rmsnorm};
use crate::mhc::{HcActs, HcDims};
use anyhow::{bail, Result};

/// One MTP block's own activations over `N` rows.
#[derive(Default)]
pub(crate) struct MtpActs {
    /// Input tokens `u_j` `[N]`.
    pub(crate) u: Vec<u32>,
    /// `E[u_j]` `[N, D]`.
    emb: Vec<f32>,
    /// `e = rms(E[u_j]; enorm)` `[N, D]` and its `1/rms`.
    en: NormActs,
    /// `rms(H^j; hnorm)` per stream `[N·n, D]` and its `1/rms`.
    hn: NormActs,
    /// `e·e_projᵀ` `[N, D]` (forward); `dL/d(e·e_projᵀ)` (backward).
    ep: Vec<f32>,
    /// The mHC head's collapse of `H^{j+1}` (`head.y` `[N, D]`).
    head: HcActs,
    /// The final norm `[N, D]`: the rows the shared head reads.
    nf: NormActs,
}

/// The MTP blocks' activations and backward scratch.
#[derive(Default)]
pub(crate) struct MtpWs {
    /// One per MTP block that runs (`Workspace::mtp_depths`).
    pub(crate) depths: Vec<MtpActs>,
    /// `dL/dX^L` (the main model's last streams) `[N, w]` while the MTP blocks run backward:
    /// the main head's gradient in, plus the MTP's out.
    pub(crate) dx_main: Vec<f32>,
    /// `dL/dH^j` handed from block `j` to block `j − 1` `[N, w]`.
    carry: Vec<f32>,
    /// `dL/d rms(H^j; hnorm)` `[N·n, D]`.
    dhn: Vec<f32>,
    /// `dL/de`, `dL/dE[u_j]` `[N, D]`.
    de: Vec<f32>,
    demb: Vec<f32>,
}

impl MtpWs {
    /// Buffers of `depths` MTP blocks of `c` over `n` rows.
    pub(crate) fn new(c: &ModelConfig, n: usize, depths: usize) -> Self {
        if depths == 0 {
            return MtpWs::default();
        }
        let d = c.d_model;
        let hcd = HcDims::from_config(c);
        let w = Stream::of(c).width();
        let z = |len: usize| vec![0.0f32; len];
        MtpWs {
            depths: (0..depths)
                .map(|_| MtpActs {
                    u: vec![0; n],
                    emb: z(n * d),
                    en: NormActs::new(n, d),
                    hn: NormActs::new(n * w / d, d),
                    ep: z(n * d),
                    head: hcd.map_or_else(HcActs::default, |dm| HcActs::new(&dm, n, true)),
                    nf: NormActs::new(n, d),
                })
                .collect(),
            dx_main: z(n * w),
            carry: z(n * w),
            dhn: z(n * w),
            de: z(n * d),
            demb: z(n * d),
        }
    }
}

/// The input tokens of MTP block `j` over a batch `tokens: [b, t]`: `u[i] = tokens[i + 1 + j]`
/// within each sequence, the sequence's last token where there is none (rows without a target).
pub fn mtp_inputs(tokens: &[u32], b: usize, t: usize, j: usize, u: &mut Vec<u32>) {
    u.clear();
    for row in tokens.chunks(t).take(b) {
        u.extend((0..t).map(|i| row[(i + 1 + j).min(t - 1)]));
    }
}

/// The targets of MTP block `j` given the batch's next-token targets `[b, t]`
/// (`targets[i]` = the token after `tokens[i]`): `y[i] = targets[i + 1 + j]` within each
/// sequence, [`IGNORE`] where there is none.
pub fn mtp_targets(targets: &[u32], b: usize, t: usize, j: usize) -> Vec<u32> {
    let mut y = Vec::with_capacity(b * t);
    for row in targets.chunks(t).take(b) {
        y.extend((0..t).map(|i| row.get(i + 1 + j).copied().unwrap_or(IGNORE)));
    }
    y
}

impl Model {
    /// Forward of the MTP blocks of `ws` (`Workspace::mtp_depths`) after the main model's
    /// blocks over `tokens: [b, t]` (`ws.streams[2L]` holds `X^L`); with `head`, also each
    /// block's mHC head and final norm (the rows its logits are computed from).
    pub(crate) fn mtp_forward(
        &self,
        tokens: &[u32],
        b: usize,
        t: usize,
        ws: &mut Workspace,
        head: bool,
    ) -> Result<()> {
        for j in 0..ws.mtp.depths.len() {
            mtp_inputs(tokens, b, t, j, &mut ws.mtp.depths[j].u);
            self.mtp_block_forward(j, b, t, ws, head)?;
        }
        Ok(())
    }

    /// MTP block `j` forward on its inputs `ws.mtp.depths[j].u` (module docs).
    fn mtp_block_forward(
        &self,
        j: usize,
        b: usize,
        t: usize,
        ws: &mut Workspace,
        head: bool,
    ) -> Result<()> {
        let c = &self.cfg;
        let (d, eps) = (c.d_model, c.norm_eps);
        let st = Stream::of(c);
        let nl = c.n_layers;
        let (l, mo) = (nl + j, self.layout.mtp[j]);
        let s_in = if j == 0 {
            2 * nl
        } else {
            block_stream(nl, l - 1) + 2
        };
        let s0 = block_stream(nl, l);
        let Workspace {
            streams,
            ssq,
            layers,
            mtp,
            ..
        } = ws;
        let a = &mut mtp.depths[j];
        {
            let (before, after) = streams.split_at_mut(s0);
            let mut none = [];
            let sq = ssq.get_mut(s0).map_or(&mut none[..], |s| &mut s[..]);
            self.mtp_input(j, a, &before[s_in], &mut after[0], sq);
        }
        let xs = &mut streams[s0..s0 + 3];
        let sq = if ssq.is_empty() {
            &mut ssq[..]
        } else {
            &mut ssq[s0..s0 + 3]
        };
        let mut rows = BlockRows {
            kv: Kv::Batch { b, t, dsa: None },
            ffn: FfnRows {
                tokens: &a.u,
                seq_len: t,
                aux: true,
                plan: &Plan::F32,
            },
            mem: Mem::None,
        };
        self.block_forward(l, xs, sq, &mut layers[l], &mut rows)?;
        if head {
            let last = ssq.get(s0 + 2).map_or(&[][..], |v| &v[..]);
            let y = st.collapse(
                &self.params,
                mo.hc_head,
                (&streams[s0 + 2], last),
                &mut a.head,
            );
            let nf = &mut a.nf;
            rmsnorm::forward(&mut nf.y, &mut nf.rstd, y, self.w(mo.norm, d), d, eps);
        }
        Ok(())
    }

    /// Backward of the MTP blocks of the last forward pass over `[b, t]` with next-token
    /// `targets`: adds `grad_scale·λ·dL_mtp/dθ` into `grads` (λ = `ws.mtp_weight`; the MoE
    /// balance loss of the blocks with `grad_scale`, as the main layers') and
    /// `grad_scale·λ·dL_mtp/dX^L` into `ws.mtp.dx_main`. Uses `ws.logits`, `ws.dx` and the
    /// main backward's scratch. Returns `L_mtp`.
    pub(crate) fn mtp_backward(
        &self,
        targets: &[u32],
        b: usize,
        t: usize,
        grads: &mut [f32],
        grad_scale: f32,
        ws: &mut Workspace,
    ) -> f64 {
        let c = &self.cfg;
        let (d, v) = (c.d_model, c.vocab_size);
        let n = b * t;
        let st = Stream::of(c);
        let nh = st.width() / d;
        let nl = c.n_layers;
        let ly = &self.layout;
        let depths = ws.mtp.depths.len();
        let lam = ws.mtp_weight / depths as f32;
        let mut total = 0.0f64;
        for j in (0..depths).rev() {
            let (l, mo) = (nl + j, ly.mtp[j]);
            let s0 = block_stream(nl, l);
            // Head: logits, cross-entropy, the shared head's backward, the final norm and the
            // block's mHC head. ws.dx = dL/dH^{j+1}.
            let y = mtp_targets(targets, b, t, j);
            let kept = cross_entropy::counted(&y).max(1);
            let a = &ws.mtp.depths[j];
            let out = self.w(ly.output, v * d);
            linear_forward(&mut ws.logits, &a.nf.y, out, n, d, v, false);
            let scale = grad_scale * lam / kept as f32;
            cross_entropy::forward_backward(&mut ws.losses, &mut ws.logits, &y, v, scale);
            total += cross_entropy::sum(&ws.losses) / kept as f64;
            let dout = &mut grads[ly.output..ly.output + v * d];
            linear_backward(
                Some((&mut ws.dtmp, false)),
                dout,
                &ws.logits,
                &a.nf.y,
                out,
                n,
                d,
                v,
            );
            let collapsed = match st {
                Stream::Plain { .. } => &ws.streams[s0 + 2],
                Stream::Hc(_) => &a.head.y,
            };
            ws.hcs.dy.resize(n * d, 0.0);
            rmsnorm::backward(
                &mut ws.hcs.dy,
                &mut grads[mo.norm..mo.norm + d],
                &ws.dtmp,
                collapsed,
                self.w(mo.norm, d),
                &a.nf.rstd,
                d,
                false,
            );
            st.collapse_backward(
                &self.params,
                grads,
                mo.hc_head,
                &ws.streams[s0 + 2],
                &a.head,
                &ws.hcs.dy,
                &mut ws.dx,
                &mut ws.hcs.draw,
            );
            if j + 1 < depths {
                ws.dx
                    .iter_mut()
                    .zip(&ws.mtp.carry)
                    .for_each(|(a, b)| *a += b);
            }
            // The block: ws.dx = dL/dY.
            self.block_backward(l, (b, t), grads, grad_scale, ws);
            let m = &mut ws.mtp;
            let a = &mut m.depths[j];
            // The embedding path: Σ_k dY[·, k] → e_proj → enorm → E[u_j].
            st.expand_backward(&mut a.ep, &ws.dx);
            linear_backward(
                Some((&mut m.de, false)),
                &mut grads[mo.e_proj..mo.e_proj + d * d],
                &a.ep,
                &a.en.y,
                self.w(mo.e_proj, d * d),
                n,
                d,
                d,
            );
            rmsnorm::backward(
                &mut m.demb,
                &mut grads[mo.enorm..mo.enorm + d],
                &m.de,
                &a.emb,
                self.w(mo.enorm, d),
                &a.en.rstd,
                d,
                false,
            );
            embedding::backward(&mut grads[ly.embed..ly.embed + v * d], &m.demb, &a.u, d);
            // The stream path: dY → h_proj → hnorm → H^j (the main model's X^L for j = 0).
            linear_backward(
                Some((&mut m.dhn, false)),
                &mut grads[mo.h_proj..mo.h_proj + d * d],
                &ws.dx,
                &a.hn.y,
                self.w(mo.h_proj, d * d),
                n * nh,
                d,
                d,
            );
            let (h, dh, acc) = if j == 0 {
                (&ws.streams[2 * nl], &mut m.dx_main, true)
            } else {
                (
                    &ws.streams[block_stream(nl, l - 1) + 2],
                    &mut m.carry,
                    false,
                )
            };
            rmsnorm::backward(
                dh,
                &mut grads[mo.hnorm..mo.hnorm + d],
                &m.dhn,
                h,
                self.w(mo.hnorm, d),
                &a.hn.rstd,
                d,
                acc,
            );
        }
        total / depths as f64
    }

    /// `L_mtp` (module docs) of the last forward pass given its next-token `targets` (no
    /// gradient; 0 when no MTP block ran: see `Workspace::mtp_weight`).
    pub fn mtp_loss(&self, targets: &[u32], ws: &Workspace) -> f64 {
        let depths = ws.mtp.depths.len();
        if depths == 0 {
            return 0.0;
        }
        let (d, v) = (self.cfg.d_model, self.cfg.vocab_size);
        let (b, t) = (ws.b, ws.t);
        let n = b * t;
        let mut logits = vec![0.0f32; n * v];
        let mut losses = vec![0.0f32; n];
        let out = self.w(self.layout.output, v * d);
        let mut total = 0.0;
        for (j, a) in ws.mtp.depths.iter().enumerate() {
            let y = mtp_targets(targets, b, t, j);
            linear_forward(&mut logits, &a.nf.y, out, n, d, v, false);
            cross_entropy::forward(&mut losses, &logits, &y, v);
            total += cross_entropy::sum(&losses) / cross_entropy::counted(&y).max(1) as f64;
        }
        total / depths as f64
    }

    /// The first MTP block's logits `[rows.len(), V]` (row `r` of the result: batch row
    /// `rows[r]`) for the batch of the last forward pass on `ws` (`[b, t]`, any
    /// `mtp_weight`), its input tokens given: `next[i]` is the token after `tokens[i]` (a
    /// draft model proposes the token after `next[i]`). Re-runs the block (its attention over
    /// the whole batch); the main model's activations are left as they are.
    pub fn mtp_logits(&self, next: &[u32], rows: &[usize], ws: &mut Workspace) -> Result<Vec<f32>> {
        let c = &self.cfg;
        if c.mtp_layers() == 0 {
            bail!("the model has no MTP block (v4.num_nextn_predict_layers = 0)");
        }
        let (b, t) = (ws.b, ws.t);
        if ws.n_layers != c.n_layers || ws.streams.is_empty() || next.len() != b * t {
            bail!(
                "mtp_logits: {} input tokens for a workspace of {b} × {t} rows (run the model's forward pass first)",
                next.len()
            );
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= b * t) {
            bail!("mtp_logits: row {r} is outside the batch of {} rows", b * t);
        }
        if let Some(&x) = next.iter().find(|&&x| x as usize >= c.vocab_size) {
            bail!("mtp_logits: token {x} is outside the vocabulary");
        }
        let depths = ws.mtp.depths.len().max(1);
        ws.ensure_mtp(c, depths);
        ws.mtp.depths[0].u.copy_from_slice(next);
        self.mtp_block_forward(0, b, t, ws, true)?;
        let (d, v) = (c.d_model, c.vocab_size);
        let y = &ws.mtp.depths[0].nf.y;
        let x: Vec<f32> = rows
            .iter()
            .flat_map(|&r| y[r * d..(r + 1) * d].iter().copied())
            .collect();
        let mut logits = vec![0.0f32; rows.len() * v];
        let out = self.w(self.layout.output, v * d);
        linear_forward(&mut logits, &x, out, rows.len(), d, v, false);
        Ok(logits)
    }
}

impl Model {
    /// MTP block `j`'s input over `N` rows (module docs): `y[i, k] = e[i]·e_projᵀ +
    /// rms(h[i, k]; hnorm)·h_projᵀ` `[N, n, D]` with `e = rms(E[a.u]; enorm)`, and the
    /// per-stream sums of squares `sq` of `y` (hc/mhc; empty when plain). `h: [N, n, D]` is
    /// `H^j` (the main model's last streams for `j = 0`); `a` keeps the activations (`a.u`
    /// the input tokens). The training and the cached driver both call it.
    pub(crate) fn mtp_input(
        &self,
        j: usize,
        a: &mut MtpActs,
        h: &[f32],
        y: &mut [f32],
        sq: &mut [f32],
    ) {
        let c = &self.cfg;
        let (d, eps) = (c.d_model, c.norm_eps);
        let n = a.u.len();
        let nh = Stream::of(c).width() / d;
        let mo = self.layout.mtp[j];
        a.emb.resize(n * d, 0.0);
        self.embed_rows(&mut a.emb, &a.u);
        rmsnorm::forward(
            &mut a.en.y,
            &mut a.en.rstd,
            &a.emb,
            self.w(mo.enorm, d),
            d,
            eps,
        );
        // The official numerics round both products' inputs (`Model::act_quant_at`).
        let q = |off: usize| self.act_quant_at.get(&off).copied();
        let en = rounded_rows(q(mo.e_proj), &a.en.y, d);
        linear_forward(&mut a.ep, &en, self.w(mo.e_proj, d * d), n, d, d, false);
        let hn = &mut a.hn;
        rmsnorm::forward(&mut hn.y, &mut hn.rstd, h, self.w(mo.hnorm, d), d, eps);
        let hy = rounded_rows(q(mo.h_proj), &hn.y, d);
        linear_forward(y, &hy, self.w(mo.h_proj, d * d), n * nh, d, d, false);
        // Y[i, k] += e_proj(e)[i], and the per-stream sums of squares of Y (hc/mhc).
        add_to_streams(y, sq, &a.ep, nh, d);
    }
}

impl Model {
    /// MTP block `j`'s logits `[V]` at batch row `row` of the last training forward on `ws`
    /// (its input token `tokens[row + 1 + j]`): the chained drafts' oracle.
    #[cfg(test)]
    pub(crate) fn mtp_row_logits(&self, ws: &Workspace, j: usize, row: usize) -> Vec<f32> {
        let (d, v) = (self.cfg.d_model, self.cfg.vocab_size);
        let x = &ws.mtp.depths[j].nf.y[row * d..(row + 1) * d];
        let mut out = vec![0.0f32; v];
        linear_forward(
            &mut out,
            x,
            self.w(self.layout.output, v * d),
            1,
            d,
            v,
            false,
        );
        out
    }
}

/// `x[i, k] += y[i]` for every stream `k` of `x: [N, n, d]`, and the per-stream sums of
/// squares `ssq[i, k]` of the result (`ssq` empty: none kept).
fn add_to_streams(x: &mut [f32], ssq: &mut [f32], y: &[f32], n: usize, d: usize) {
    use rayon::prelude::*;
    x.par_chunks_mut(n * d)
        .zip(y.par_chunks(d))
        .for_each(|(x, y)| {
            for s in x.chunks_mut(d) {
                s.iter_mut().zip(y).for_each(|(a, b)| *a += b);
            }
        });
    if !ssq.is_empty() {
        ssq.par_chunks_mut(n)
            .zip(x.par_chunks(n * d))
            .for_each(|(sq, x)| {
                for (k, s) in sq.iter_mut().zip(x.chunks(d)) {
                    *k = s.iter().map(|v| v * v).sum();
                }
            });
    }
}
