//! The training driver: a batch of `b` sequences × `t` positions through every block (keys
//! and values from the batch itself), the head and the loss, and the backward pass.
//!
//! ```text
//! h = E[tokens]                    [N, d]     (N = b·t)
//! x⁰ = expand(h)                   [N, w]     (w = d plain, n·d with hyper-connections)
//! x^{l+1} = Block_l(x^l)                      (module `block`)
//! logits = RMSNorm(collapse(x^L))·Woutᵀ      [N, V]
//! loss = mean CE(logits, targets) (+ the MoE balance loss) (+ λ·L_mtp: the MTP blocks on
//!        x^L, module `mtp`, when the workspace runs them)
//! ```

use super::attention::{DsaBatch, Kv};
use super::block::{BlockRows, Mem};
use super::decode::Plan;
use super::ffn::FfnRows;
use super::residual::Stream;
use super::{Model, Workspace};
use crate::dsa::{DsaRun, DsaStage, DsaStats};
use crate::kernels::matmul::{linear_backward_frozen, linear_forward};
use crate::kernels::{cross_entropy, embedding, rmsnorm};
use crate::prof;

impl Model {
    /// Forward pass over `tokens: [b, t]`, keeping every activation in `ws`; leaves the logits
    /// in `ws.logits` (`[b·t, V]`). A DSA model attends over its indexer's top-k selection
    /// (no indexer loss; see [`Model::forward_dsa`]).
    pub fn forward(&self, tokens: &[u32], b: usize, t: usize, ws: &mut Workspace) {
        self.try_forward(tokens, b, t, ws)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Model::forward`] of a DSA model in a given training mode: dense or sparse attention,
    /// with the indexer KL loss and/or recall measured (`ws.dsa_stats`).
    pub fn forward_dsa(&self, tokens: &[u32], b: usize, t: usize, ws: &mut Workspace, run: DsaRun) {
        assert!(
            self.cfg.has_indexer(),
            "forward_dsa needs a model with an indexer"
        );
        self.forward_run(tokens, b, t, ws, Some(run))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Model::forward`] that returns an error where the Engram lookup fails (a memory-mapped
    /// table whose file vanished or changed size) instead of panicking.
    pub fn try_forward(
        &self,
        tokens: &[u32],
        b: usize,
        t: usize,
        ws: &mut Workspace,
    ) -> anyhow::Result<()> {
        let run = self.cfg.has_indexer().then_some(DsaRun::INFERENCE);
        self.forward_run(tokens, b, t, ws, run)
    }

    fn forward_run(
        &self,
        tokens: &[u32],
        b: usize,
        t: usize,
        ws: &mut Workspace,
        run: Option<DsaRun>,
    ) -> anyhow::Result<()> {
        let c = &self.cfg;
        if self.packed_only {
            anyhow::bail!(
                "this model keeps its big weights packed only (no f32 copy): the full forward \
                 and training need f32 weights; run it through the cache (decoding) or load it \
                 without keeping the weights packed"
            );
        }
        assert_eq!(tokens.len(), b * t, "tokens must be [b, t]");
        assert!(
            t <= c.max_seq_len,
            "sequence length {t} exceeds max_seq_len {}",
            c.max_seq_len
        );
        ws.ensure(c, b, t);
        ws.dsa_run = run;
        ws.dsa_stats = DsaStats::default();
        ws.mtp_loss = 0.0;
        let n = b * t;
        let (d, v) = (c.d_model, c.vocab_size);
        let st = Stream::of(c);
        let mut mems = self.engram_prelude(tokens, b, t, &mut ws.eng)?;
        embedding::forward(&mut ws.x0, self.w(self.layout.embed, v * d), tokens, d);
        {
            let mut none = [];
            let s0 = ws.ssq.first_mut().map_or(&mut none[..], |v| &mut v[..]);
            st.expand(&mut ws.streams[0], s0, &ws.x0);
        }
        let mut db = run.map(|run| DsaBatch {
            run,
            freeze: ws.dsa_freeze_selection,
            od: &mut ws.dsa_o,
            lsed: &mut ws.dsa_lse,
            kl: 0.0,
            recall: 0.0,
        });
        let ffn = FfnRows {
            tokens,
            seq_len: t,
            aux: true,
            plan: &Plan::F32,
        };
        for l in 0..c.n_layers {
            let (xs, ssq) = (&mut ws.streams[2 * l..2 * l + 3], &mut ws.ssq);
            let ssq = if ssq.is_empty() {
                &mut ssq[..]
            } else {
                &mut ssq[2 * l..2 * l + 3]
            };
            let mut rows = BlockRows {
                kv: Kv::Batch {
                    b,
                    t,
                    dsa: db.as_mut(),
                },
                ffn,
                mem: match self.engram_layer_of(l) {
                    Some(_) => Mem::Batch {
                        mems: &mut mems,
                        eng: &mut ws.eng,
                    },
                    None => Mem::None,
                },
            };
            self.block_forward(l, xs, ssq, &mut ws.layers[l], &mut rows)?;
        }
        if let Some(db) = db {
            let denom = (c.n_indexer_layers().max(1) * n) as f64;
            ws.dsa_stats = DsaStats {
                kl: db.kl / denom,
                recall: db.run.recall.then_some(db.recall / denom),
            };
        }
        // The MTP blocks (when this workspace runs them), from the last streams x^L.
        {
            let _s = prof::span("mtp.fwd");
            self.mtp_forward(tokens, b, t, ws, !ws.skip_head)?;
        }
        ws.aux_loss = ws.layers.iter().map(|la| la.ffn.moe.aux_loss).sum();
        if ws.skip_head {
            return Ok(());
        }
        let _s = prof::span("head.fwd");
        let last = 2 * c.n_layers;
        let ssq_last = ws.ssq.get(last).map_or(&[][..], |v| &v[..]);
        let y = st.collapse(
            &self.params,
            self.layout.hc_head,
            (&ws.streams[last], ssq_last),
            &mut ws.hc_head,
        );
        let nf = &mut ws.norm_f;
        let w = self.w(self.layout.norm, d);
        rmsnorm::forward(&mut nf.y, &mut nf.rstd, y, w, d, c.norm_eps);
        let out = self.w(self.layout.output, v * d);
        // llama.cpp's numerics (a GGUF's quantised head): its input rounded as ggml does.
        let q = self.act_quant_at.get(&self.layout.output).copied();
        let y = crate::kernels::act_quant::rounded_rows(q, &nf.y, d);
        linear_forward(&mut ws.logits, &y, out, n, d, v, false);
        Ok(())
    }

    /// Mean cross-entropy of the logits left by [`Model::forward`] (no gradient), over the
    /// targets other than [`cross_entropy::IGNORE`] (0 when none counts).
    pub fn loss(&self, targets: &[u32], ws: &mut Workspace) -> f64 {
        let v = self.cfg.vocab_size;
        cross_entropy::forward(&mut ws.losses, &ws.logits, targets, v);
        cross_entropy::sum(&ws.losses) / cross_entropy::counted(targets).max(1) as f64
    }

    /// Forward + backward on one batch: adds `grad_scale · dL/dθ` into `grads` and returns the
    /// (unscaled) loss L = mean CE over the batch + the MoE balance loss when enabled, plus
    /// `ws.mtp_weight`·L_mtp when the workspace runs the model's MTP blocks (module
    /// [`super::mtp`]; L_mtp is left in `ws.mtp_loss`). A DSA model trains in the sparse
    /// stage (see [`Model::forward_backward_dsa`]).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &self,
        tokens: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        grads: &mut [f32],
        grad_scale: f32,
        ws: &mut Workspace,
    ) -> f64 {
        self.try_forward_backward(tokens, targets, b, t, grads, grad_scale, ws)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// [`Model::forward_backward`] that returns an error where the Engram lookup fails (a
    /// memory-mapped table whose file vanished or changed size) instead of panicking.
    #[allow(clippy::too_many_arguments)]
    pub fn try_forward_backward(
        &self,
        tokens: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        grads: &mut [f32],
        grad_scale: f32,
        ws: &mut Workspace,
    ) -> anyhow::Result<f64> {
        let run = self.cfg.has_indexer().then_some(DsaRun {
            stage: DsaStage::Sparse,
            kl: true,
            recall: false,
        });
        self.forward_backward_run(tokens, targets, b, t, grads, grad_scale, ws, run)
    }

    /// Forward + backward of a DSA model in a training stage (module [`crate::dsa`]):
    /// - `Dense`: dense attention; LM-loss gradients for the model, the dense KL gradient for
    ///   the indexer (input detached).
    /// - `Warmup`: dense attention; only the indexer's parameters receive gradients (of the
    ///   KL to the dense attention when `run.kl`); every other gradient stays untouched.
    /// - `Sparse`: top-k sparse attention; LM-loss gradients for the model, the selected-set
    ///   KL gradient for the indexer (its input detached).
    ///
    /// Returns the LM loss (+ MoE balance loss); the indexer KL and recall are in `ws.dsa_stats`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward_dsa(
        &self,
        tokens: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        grads: &mut [f32],
        grad_scale: f32,
        ws: &mut Workspace,
        run: DsaRun,
    ) -> f64 {
        assert!(
            self.cfg.has_indexer(),
            "forward_backward_dsa needs a model with an indexer"
        );
        self.forward_backward_run(tokens, targets, b, t, grads, grad_scale, ws, Some(run))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    #[allow(clippy::too_many_arguments)]
    fn forward_backward_run(
        &self,
        tokens: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        grads: &mut [f32],
        grad_scale: f32,
        ws: &mut Workspace,
        run: Option<DsaRun>,
    ) -> anyhow::Result<f64> {
        assert_eq!(grads.len(), self.layout.total);
        assert_eq!(targets.len(), b * t);
        self.forward_run(tokens, b, t, ws, run)?;
        if let Some(r) = run.filter(|r| r.stage == DsaStage::Warmup) {
            // Everything but the indexer is frozen: no LM backward at all.
            let loss = self.loss(targets, ws) + ws.aux_loss;
            if r.kl {
                self.dsa_indexer_backward(b, t, grads, grad_scale, ws);
            }
            return Ok(loss);
        }
        let c = &self.cfg;
        let n = b * t;
        let (d, v) = (c.d_model, c.vocab_size);
        let ly = &self.layout;
        let st = Stream::of(c);

        // Mean over the counted targets (all but `IGNORE`); none counted: zero LM gradient.
        let head = prof::span("head.bwd");
        let kept = cross_entropy::counted(targets).max(1);
        cross_entropy::forward_backward(
            &mut ws.losses,
            &mut ws.logits,
            targets,
            v,
            grad_scale / kept as f32,
        );
        let loss = cross_entropy::sum(&ws.losses) / kept as f64 + ws.aux_loss;
        let (fz, lowest) = (ws.frozen_backbone, self.lowest_engram_block());
        // Output projection, final norm and collapse. ws.dx = dL/dx^L.
        linear_backward_frozen(
            Some((&mut ws.dtmp, false)),
            (!fz).then_some(&mut grads[ly.output..ly.output + v * d]),
            &ws.logits,
            &ws.norm_f.y,
            self.w(ly.output, v * d),
            n,
            d,
            v,
        );
        let last = 2 * c.n_layers;
        let collapsed = match st {
            Stream::Plain { .. } => &ws.streams[last],
            Stream::Hc(_) => &ws.hc_head.y,
        };
        let dy = &mut ws.hcs.dy;
        dy.resize(n * d, 0.0);
        rmsnorm::backward(
            dy,
            &mut grads[ly.norm..ly.norm + d],
            &ws.dtmp,
            collapsed,
            self.w(ly.norm, d),
            &ws.norm_f.rstd,
            d,
            false,
        );
        st.collapse_backward(
            &self.params,
            grads,
            ly.hc_head,
            &ws.streams[last],
            &ws.hc_head,
            &ws.hcs.dy,
            &mut ws.dx,
            &mut ws.hcs.draw,
        );
        drop(head);
        // The MTP blocks (module `mtp`): their loss, their gradients, and theirs of x^L added
        // to the head's.
        let mut loss = loss;
        if !ws.mtp.depths.is_empty() {
            let _s = prof::span("mtp.bwd");
            std::mem::swap(&mut ws.dx, &mut ws.mtp.dx_main);
            ws.mtp_loss = self.mtp_backward(targets, b, t, grads, grad_scale, ws);
            std::mem::swap(&mut ws.dx, &mut ws.mtp.dx_main);
            loss += ws.mtp_weight as f64 * ws.mtp_loss;
        }
        for l in (0..c.n_layers).rev() {
            self.block_backward(l, (b, t), grads, grad_scale, ws);
            if fz && lowest == Some(l) {
                return Ok(loss); // frozen below: nothing left to train
            }
        }
        if fz {
            return Ok(loss);
        }
        st.expand_backward(&mut ws.dtmp, &ws.dx);
        embedding::backward(&mut grads[ly.embed..ly.embed + v * d], &ws.dtmp, tokens, d);
        if ws.dsa_run.is_some_and(|r| r.kl) {
            self.dsa_indexer_backward(b, t, grads, grad_scale, ws);
        }
        Ok(loss)
    }

    /// Backward of every layer's indexer loss into the indexer parameters (input detached).
    fn dsa_indexer_backward(
        &self,
        b: usize,
        t: usize,
        grads: &mut [f32],
        grad_scale: f32,
        ws: &Workspace,
    ) {
        for (l, lo) in self.layout.layers.iter().enumerate() {
            if let (Some(vo), Some(la)) = (&lo.v4, ws.layers.get(l)) {
                let g = grad_scale;
                self.v4_indexer_backward(l, vo, &la.norm[0].y, (b, t), &la.attn.v4, grads, g);
            }
        }
        let (Some(dc), Some(irope)) = (self.cfg.dsa.as_ref(), self.index_rope.as_ref()) else {
            return;
        };
        let sh = super::attention::dsa_shapes(&self.cfg, b, t);
        for (l, lo) in self.layout.layers.iter().enumerate() {
            if let Some(io) = &lo.indexer {
                let la = &ws.layers[l];
                la.attn.dsa.backward(
                    &self.params,
                    grads,
                    dc,
                    irope,
                    io,
                    &la.norm[0].y,
                    sh,
                    grad_scale,
                );
            }
        }
    }
}
