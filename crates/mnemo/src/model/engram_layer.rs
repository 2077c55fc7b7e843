//! The Engram sublayer of a block (module [`crate::engram`] has the memory): `x += gate(e, x)`
//! on every stream, before the attention sublayer.
//!
//! ```text
//! training / full forward:  e = lookup(hash(N-grams of the batch))   (the prelude, ids only)
//!                           y = gate(e, x; positions in documents)   [N, w]   x ← x + y
//! cached:                   the same per new row, from the cache's token history and each
//!                           gate's convolution history (`engram::EngramState`)
//! ```
//!
//! Backward (training): the query-path gradient joins `dL/dx` (the residual passes it through),
//! the gate's parameters get theirs, and each table a sparse gradient.

use super::attention::Span;
use super::workspace::EngramWs;
use super::Model;
use crate::engram::{self, SparseGrad};
use anyhow::{Context, Result};

impl Model {
    /// The lowest block with an active Engram layer (where a frozen-backbone backward stops).
    pub(crate) fn lowest_engram_block(&self) -> Option<usize> {
        let e = self.engram.as_ref().filter(|e| !e.off)?;
        e.layers.iter().map(|l| l.hash.layer_id).min()
    }

    /// The Engram layer of block `l`, if it has one.
    pub(crate) fn engram_layer_of(&self, l: usize) -> Option<usize> {
        self.engram.as_ref().and_then(|e| e.layer_of_block(l))
    }

    /// Engram prelude of a forward pass over `[b, t]`: positions inside documents and every
    /// layer's lookup (hash + gather; ids only, so it runs before the blocks).
    pub(crate) fn engram_prelude(
        &self,
        tokens: &[u32],
        b: usize,
        t: usize,
        eng: &mut EngramWs,
    ) -> Result<Vec<engram::Memory>> {
        let Some(e) = &self.engram else {
            return Ok(Vec::new());
        };
        eng.pos = engram::positions_in_documents(tokens, b, t, self.engram_eot);
        eng.acts.resize_with(e.layers.len(), Default::default);
        let cids = e.compress.compress(tokens);
        e.lookup_all(&cids, &eng.pos)
            .context("engram lookup failed")
    }

    /// Engram layer `i`'s gate on the streams `h: [N, w]` of a batch into `eng.y`, keeping its
    /// activations.
    pub(crate) fn engram_gate_forward(
        &self,
        i: usize,
        mems: &mut [engram::Memory],
        h: &[f32],
        eng: &mut EngramWs,
    ) {
        let layer = &self.engram.as_ref().expect("engram").layers[i];
        let mem = std::mem::take(&mut mems[i]);
        eng.y.resize(h.len(), 0.0);
        engram::gate::forward(
            &layer.gate,
            self.engram_gate_params(i),
            &mem.e,
            h,
            &eng.pos,
            &mut eng.y,
            &mut eng.acts[i].gate,
        );
        eng.acts[i].rows = mem.rows;
    }

    /// Engram layer `i` over the new rows of each sequence of a cached forward, one position
    /// at a time from its cache's decode state: `h: [N, w]` streams in, `y: [N, w]` out.
    /// `cids`: the compressed ids of the stacked rows.
    pub(crate) fn engram_cached(
        &self,
        i: usize,
        tokens: &[u32],
        cids: &[u32],
        h: &[f32],
        y: &mut [f32],
        spans: &mut [Span],
    ) -> Result<()> {
        let e = self.engram.as_ref().expect("engram");
        let layer = &e.layers[i];
        let w = h.len() / tokens.len();
        let keep = e.cfg.max_ngram_size - 1;
        for sp in spans.iter_mut() {
            let st = sp
                .cache
                .engram
                .as_mut()
                .context("KV cache without Engram state")?;
            let mut hist = st.history.clone();
            for r in sp.r0..sp.r0 + sp.n {
                let (tid, cid) = (tokens[r], cids[r]);
                let rows = layer.hash.rows_step(&hist, cid);
                let emb = layer.table.prefetch(&rows)?;
                engram::gate::forward_step(
                    &layer.gate,
                    self.engram_gate_params(i),
                    &emb,
                    &h[r * w..(r + 1) * w],
                    &mut st.gates[i],
                    &mut y[r * w..(r + 1) * w],
                );
                if Some(tid) == self.engram_eot {
                    hist.clear();
                    st.gates[i].reset();
                } else {
                    hist.push(cid);
                    if hist.len() > keep {
                        hist.remove(0);
                    }
                }
            }
        }
        Ok(())
    }

    /// After a cached forward: each sequence's token history moves past its new rows (the
    /// gates' histories moved layer by layer).
    pub(crate) fn engram_advance(&self, tokens: &[u32], cids: &[u32], spans: &mut [Span]) {
        let Some(e) = self.engram.as_ref() else {
            return;
        };
        let keep = e.cfg.max_ngram_size - 1;
        for sp in spans.iter_mut() {
            let Some(st) = sp.cache.engram.as_mut() else {
                continue;
            };
            for r in sp.r0..sp.r0 + sp.n {
                if Some(tokens[r]) == self.engram_eot {
                    st.history.clear();
                } else {
                    st.history.push(cids[r]);
                    if st.history.len() > keep {
                        st.history.remove(0);
                    }
                }
            }
        }
    }

    /// Backward of Engram layer `i` given `dx = dL/dh` after the addition: adds the query-path
    /// gradient to `dx` (the residual passes `dx` through unchanged), accumulates the gate
    /// gradient into `grads` and stores the table gradient in `table_grads[i]`.
    pub(crate) fn engram_gate_backward(
        &self,
        i: usize,
        dx: &mut [f32],
        grads: &mut [f32],
        eng: &mut EngramWs,
        table_grads: &mut Vec<SparseGrad>,
    ) {
        let e = self.engram.as_ref().expect("engram");
        let layer = &e.layers[i];
        let o = self.layout.engram_gate[i];
        let np = layer.gate.n_params();
        eng.dy.clear();
        eng.dy.extend_from_slice(dx);
        let acts = &eng.acts[i];
        let dim = layer.table.dim();
        let mut de = vec![0.0f32; acts.rows.len() * dim];
        engram::gate::backward(
            &layer.gate,
            &self.params[o..o + np],
            &acts.gate,
            &eng.dy,
            dx,
            &mut de,
            &mut grads[o..o + np],
        );
        table_grads.resize_with(e.layers.len(), Default::default);
        table_grads[i] = SparseGrad::from_gather(&acts.rows, &de, dim);
    }
}
