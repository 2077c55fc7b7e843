//! One transformer block, written once for every driver:
//!
//! ```text
//! x ← x + Engram(x)                      (blocks in engram.layer_ids; module `engram_layer`)
//! x ← R(x, Attention ∘ RMSNorm)          (dense | DSA | MLA | V4;  module `attention`)
//! x ← R(x, FeedForward ∘ RMSNorm)        (dense | MoE;  module `ffn`)
//! ```
//!
//! `R` is the residual strategy (plain | HC | mHC; module `residual`). A driver hands the block
//! the stream buffers (entering the block, between its sublayers, after it), the block's
//! activations, and a [`BlockRows`]: where keys, values and memory come from and which rows run.
//! The training driver keeps every block's buffers for the backward pass
//! ([`Model::block_backward`]); the cached driver reuses one set.

use super::attention::Kv;
use super::ffn::FfnRows;
use super::residual::{Pre, Stream};
use super::workspace::{EngramWs, LayerActs, Workspace};
use super::Model;
use crate::engram;
use crate::prof;
use anyhow::Result;

/// The Engram side of a block's rows.
pub(crate) enum Mem<'a> {
    /// No Engram, or a block without an Engram layer.
    None,
    /// A batch: the prelude's lookups and the activations kept for the backward pass.
    Batch {
        mems: &'a mut [engram::Memory],
        eng: &'a mut EngramWs,
    },
    /// Cached rows: the compressed ids of the stacked rows (the state is in each cache).
    Cache { cids: &'a [u32] },
}

/// Everything a driver decides for a block.
pub(crate) struct BlockRows<'a, 'w, 'c> {
    pub(crate) kv: Kv<'a, 'w, 'c>,
    pub(crate) ffn: FfnRows<'a>,
    pub(crate) mem: Mem<'a>,
}

impl Model {
    /// Block `l` forward: `xs[0]` (the stream entering it; Engram adds into it in place) →
    /// `xs[1]` (after attention) → `xs[2]` (after the feed-forward); `ssq` likewise (hc/mhc;
    /// empty when plain).
    pub(crate) fn block_forward(
        &self,
        l: usize,
        xs: &mut [Vec<f32>],
        ssq: &mut [Vec<f32>],
        la: &mut LayerActs,
        rows: &mut BlockRows,
    ) -> Result<()> {
        let c = &self.cfg;
        let st = Stream::of(c);
        let lo = &self.layout.layers[l];
        if let Some(i) = self.engram_layer_of(l) {
            let mut y = Vec::new();
            let y = match &mut rows.mem {
                Mem::Batch { mems, eng } => {
                    self.engram_gate_forward(i, mems, &xs[0], eng);
                    std::mem::take(&mut eng.y)
                }
                Mem::Cache { cids } => {
                    let Kv::Cache(spans) = &mut rows.kv else {
                        unreachable!("cached Engram rows come with cached keys")
                    };
                    y.resize(xs[0].len(), 0.0);
                    self.engram_cached(i, rows.ffn.tokens, cids, &xs[0], &mut y, spans)?;
                    y
                }
                Mem::None => unreachable!("an Engram block without Engram rows"),
            };
            let mut none = [];
            let s0 = ssq.first_mut().map_or(&mut none[..], |v| &mut v[..]);
            st.add(&mut xs[0], s0, &y);
            if let Mem::Batch { eng, .. } = &mut rows.mem {
                eng.y = y;
            }
        }
        let plan = rows.ffn.plan;
        for k in 0..2 {
            let (before, after) = xs.split_at_mut(k + 1);
            let (x, ssq_in, ssq_out) = match ssq.len() {
                0 => (&before[k][..], &[][..], &mut [][..]),
                _ => {
                    let (sb, sa) = ssq.split_at_mut(k + 1);
                    (&before[k][..], &sb[k][..], &mut sa[0][..])
                }
            };
            let out = (&mut after[0][..], ssq_out);
            let (norm, ha) = (&mut la.norm[k], &mut la.hc[k]);
            if k == 0 {
                let pre = Pre {
                    norm: lo.attn_norm,
                    hc: lo.attn_hc,
                };
                let (attn, kv) = (&mut la.attn, &mut rows.kv);
                let _s = prof::span("attn.sublayer.fwd");
                st.forward(
                    &self.params,
                    pre,
                    c.norm_eps,
                    (x, ssq_in),
                    out,
                    ha,
                    norm,
                    |a, o, acc| {
                        let _s = prof::span("attn.fwd");
                        self.attention_forward(l, lo, a, attn, kv, plan, o, acc)
                    },
                );
            } else {
                let pre = Pre {
                    norm: lo.ffn_norm,
                    hc: lo.ffn_hc,
                };
                let (ffn, fr) = (&mut la.ffn, rows.ffn);
                let _s = prof::span("ffn.sublayer.fwd");
                st.forward(
                    &self.params,
                    pre,
                    c.norm_eps,
                    (x, ssq_in),
                    out,
                    ha,
                    norm,
                    |f, o, acc| {
                        let _s = prof::span("ffn.fwd");
                        self.ffn_forward(l, lo, f, ffn, fr, o, acc)
                    },
                );
            }
        }
        Ok(())
    }

    /// Block `l` backward over a training batch `[b, t]` (the activations of the last
    /// forward pass in `ws`; `l ≥ n_layers`: an MTP block): `ws.dx` holds `dL/d(stream after the block)` and leaves with
    /// `dL/d(stream entering it)`; parameter gradients accumulate into `grads`.
    pub(crate) fn block_backward(
        &self,
        l: usize,
        (b, t): (usize, usize),
        grads: &mut [f32],
        grad_scale: f32,
        ws: &mut Workspace,
    ) {
        let c = &self.cfg;
        let st = Stream::of(c);
        let lo = &self.layout.layers[l];
        let fz = ws.frozen_backbone;
        let sparse = ws.dsa_run.is_some_and(|r| r.stage.is_sparse());
        let la = &ws.layers[l];
        // The stream entering the block (2l for a main layer; the MTP blocks' follow them).
        let s0 = super::workspace::block_stream(c.n_layers, l);
        // Feed-forward sublayer: stream s0 + 1 → s0 + 2.
        let pre = Pre {
            norm: lo.ffn_norm,
            hc: lo.ffn_hc,
        };
        let (dh13, dg) = (&mut ws.dh13, &mut ws.dg);
        let s = prof::span("ffn.sublayer.bwd");
        st.backward(
            &self.params,
            grads,
            pre,
            &ws.streams[s0 + 1],
            &la.hc[1],
            &la.norm[1],
            &mut ws.dx,
            &mut ws.dtmp,
            &mut ws.hcs,
            |dout, df, grads| {
                let _s = prof::span("ffn.bwd");
                let f = &la.norm[1].y;
                let scratch = (&mut dh13[..], &mut dg[..]);
                self.ffn_backward(
                    lo,
                    t,
                    f,
                    &la.ffn,
                    fz,
                    (dout, df),
                    grads,
                    grad_scale,
                    scratch,
                );
            },
        );
        // Attention sublayer: stream s0 → s0 + 1.
        let pre = Pre {
            norm: lo.attn_norm,
            hc: lo.attn_hc,
        };
        drop(s);
        let (dattn, dqkv) = (&mut ws.dattn, &mut ws.dqkv);
        let s = prof::span("attn.sublayer.bwd");
        st.backward(
            &self.params,
            grads,
            pre,
            &ws.streams[s0],
            &la.hc[0],
            &la.norm[0],
            &mut ws.dx,
            &mut ws.dtmp,
            &mut ws.hcs,
            |dout, da, grads| {
                let _s = prof::span("attn.bwd");
                let a = &la.norm[0].y;
                let scratch = (&mut dattn[..], &mut dqkv[..]);
                self.attention_backward(
                    l,
                    lo,
                    (b, t),
                    a,
                    &la.attn,
                    sparse,
                    fz,
                    (dout, da),
                    grads,
                    scratch,
                );
            },
        );
        drop(s);
        if let Some(i) = self.engram_layer_of(l) {
            let tg = &mut ws.engram_table_grads;
            self.engram_gate_backward(i, &mut ws.dx, grads, &mut ws.eng, tg);
        }
    }
}
