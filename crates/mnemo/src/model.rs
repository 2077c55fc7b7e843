//! The dense decoder-only transformer ("V4-mini dense"): pre-norm blocks of causal GQA
//! attention with partial RoPE and a SwiGLU feed-forward, RMSNorm everywhere.
//!
//! ```text
//! h⁰ = E[tokens]                                                   [n, d]   (n = B·T)
//! a  = RMSNorm(hˡ)          q|k|v = a·[Wq; Wk; Wv]ᵀ                [n, (H+2KV)·d_h]
//! q, k ← RoPE(q, k)         o = CausalAttn(q, k, v)                [n, H·d_h]
//! m  = hˡ + o·Woᵀ
//! f  = RMSNorm(m)           g = silu(f·W1ᵀ) ⊙ (f·W3ᵀ)              [n, F]
//! hˡ⁺¹ = m + g·W2ᵀ
//! logits = RMSNorm(hᴸ)·Woutᵀ      (Wout = E when embeddings are tied)  [n, V]
//! loss = mean CE(logits, targets)
//! ```
//!
//! All parameters live in one flat `Vec<f32>` (and the gradients in one of the same layout),
//! so the optimiser and gradient clipping are single loops. Within a layer `wq, wk, wv` are
//! adjacent and so form one `[(H+2KV)·d_h, d]` matrix (one GEMM for q, k and v); `w1, w3`
//! likewise form `[2F, d]`. Linear weights are stored `[out, in]` as in PyTorch.
//!
//! **Initialisation** ([`Model::init`]): every matrix and the embedding ~ N(0, init_std²); the
//! two projections that write into the residual stream (`wo`, `w2`) are further scaled by
//! `1/√(2·n_layers)` (GPT-2); RMSNorm weights are 1.

use crate::config::ModelConfig;
use crate::kernels::attention::{self, AttnDims, Heads, QkvLayout};
use crate::kernels::matmul::{linear_backward, linear_forward};
use crate::kernels::rope::RopeTable;
use crate::kernels::{cross_entropy, embedding, rmsnorm, swiglu};
use crate::rng::Rng;

/// A named tensor inside the flat parameter buffer.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    /// Whether AdamW applies weight decay (matrices yes; norms and embeddings no).
    pub decay: bool,
}

impl TensorSpec {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Offsets of one layer's tensors.
#[derive(Clone, Debug)]
pub struct LayerOffsets {
    pub attn_norm: usize,
    /// `wq`, `wk`, `wv` back to back.
    pub wqkv: usize,
    pub wo: usize,
    pub ffn_norm: usize,
    /// `w1` (gate) then `w3` (up).
    pub w13: usize,
    pub w2: usize,
}

/// Where every tensor sits in the flat buffer.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub tensors: Vec<TensorSpec>,
    pub embed: usize,
    pub layers: Vec<LayerOffsets>,
    pub norm: usize,
    /// Output projection; equals `embed` when tied.
    pub output: usize,
    pub total: usize,
}

impl ParamLayout {
    pub fn new(c: &ModelConfig) -> Self {
        let mut tensors = Vec::new();
        let mut off = 0;
        let mut add = |name: String, shape: Vec<usize>, decay: bool| {
            let o = off;
            off += shape.iter().product::<usize>();
            tensors.push(TensorSpec {
                name,
                shape,
                offset: o,
                decay,
            });
            o
        };
        let (d, hd, f) = (c.d_model, c.head_dim, c.ffn_hidden);
        let embed = add("tok_embeddings.weight".into(), vec![c.vocab_size, d], false);
        let mut layers = Vec::new();
        for i in 0..c.n_layers {
            let p = |s: &str| format!("layers.{i}.{s}");
            let attn_norm = add(p("attention_norm.weight"), vec![d], false);
            let wqkv = add(p("attention.wq.weight"), vec![c.n_heads * hd, d], true);
            add(p("attention.wk.weight"), vec![c.n_kv_heads * hd, d], true);
            add(p("attention.wv.weight"), vec![c.n_kv_heads * hd, d], true);
            let wo = add(p("attention.wo.weight"), vec![d, c.n_heads * hd], true);
            let ffn_norm = add(p("ffn_norm.weight"), vec![d], false);
            let w13 = add(p("feed_forward.w1.weight"), vec![f, d], true);
            add(p("feed_forward.w3.weight"), vec![f, d], true);
            let w2 = add(p("feed_forward.w2.weight"), vec![d, f], true);
            layers.push(LayerOffsets {
                attn_norm,
                wqkv,
                wo,
                ffn_norm,
                w13,
                w2,
            });
        }
        let norm = add("norm.weight".into(), vec![d], false);
        let output = if c.tied_embeddings {
            embed
        } else {
            add("output.weight".into(), vec![c.vocab_size, d], true)
        };
        ParamLayout {
            tensors,
            embed,
            layers,
            norm,
            output,
            total: off,
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// Parameter counts by kind, for the start-of-run summary.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ParamCounts {
    pub total: usize,
    pub embedding: usize,
    pub attention: usize,
    pub ffn: usize,
    pub norms: usize,
    pub output: usize,
}

/// The model: config, flat parameters, their layout, and the RoPE table.
pub struct Model {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub params: Vec<f32>,
    pub rope: RopeTable,
}

/// Activations of one training batch, kept for the backward pass, plus backward scratch.
/// Allocated once per (B, T) and reused every step.
#[derive(Default)]
pub struct Workspace {
    b: usize,
    t: usize,
    /// Residual stream entering each layer, and after the last: `n_layers + 1` × `[n, d]`.
    xs: Vec<Vec<f32>>,
    layers: Vec<LayerActs>,
    rstd_f: Vec<f32>,
    hf: Vec<f32>,
    /// `[n, V]` logits; replaced by their gradient during the backward pass.
    pub logits: Vec<f32>,
    losses: Vec<f32>,
    dx: Vec<f32>,
    dtmp: Vec<f32>,
    dqkv: Vec<f32>,
    dattn: Vec<f32>,
    dh13: Vec<f32>,
    dg: Vec<f32>,
}

#[derive(Default)]
struct LayerActs {
    rstd1: Vec<f32>,
    a: Vec<f32>,
    qkv: Vec<f32>,
    o: Vec<f32>,
    lse: Vec<f32>,
    xmid: Vec<f32>,
    rstd2: Vec<f32>,
    f: Vec<f32>,
    h13: Vec<f32>,
    g: Vec<f32>,
}

impl Workspace {
    fn ensure(&mut self, c: &ModelConfig, b: usize, t: usize) {
        if self.b == b && self.t == t && self.layers.len() == c.n_layers {
            return;
        }
        let n = b * t;
        let (d, f, ho) = (c.d_model, c.ffn_hidden, c.n_heads * c.head_dim);
        let z = |len: usize| vec![0.0f32; len];
        self.b = b;
        self.t = t;
        self.xs = (0..=c.n_layers).map(|_| z(n * d)).collect();
        self.layers = (0..c.n_layers)
            .map(|_| LayerActs {
                rstd1: z(n),
                a: z(n * d),
                qkv: z(n * c.qkv_dim()),
                o: z(n * ho),
                lse: z(b * c.n_heads * t),
                xmid: z(n * d),
                rstd2: z(n),
                f: z(n * d),
                h13: z(n * 2 * f),
                g: z(n * f),
            })
            .collect();
        self.rstd_f = z(n);
        self.hf = z(n * d);
        self.logits = z(n * c.vocab_size);
        self.losses = z(n);
        self.dx = z(n * d);
        self.dtmp = z(n * d);
        self.dqkv = z(n * c.qkv_dim());
        self.dattn = z(n * ho);
        self.dh13 = z(n * 2 * f);
        self.dg = z(n * f);
    }
}

impl Model {
    /// A model with all-zero parameters (call [`Model::init`] or load weights).
    pub fn new(cfg: ModelConfig) -> Result<Self, crate::config::ConfigError> {
        cfg.validate()?;
        let layout = ParamLayout::new(&cfg);
        let rope = RopeTable::new(
            cfg.rope_dim,
            cfg.rope_theta,
            cfg.max_seq_len,
            cfg.rope_layout,
        );
        Ok(Model {
            params: vec![0.0; layout.total],
            layout,
            rope,
            cfg,
        })
    }

    /// The documented initialisation (module docs), fully determined by `seed`.
    pub fn init(&mut self, seed: u64) {
        let mut rng = Rng::derived(seed, "init");
        let std = self.cfg.init_std;
        let resid_scale = 1.0 / (2.0 * self.cfg.n_layers as f32).sqrt();
        for t in &self.layout.tensors {
            let p = &mut self.params[t.range()];
            if t.shape.len() == 1 {
                p.fill(1.0);
            } else if t.name.ends_with("attention.wo.weight")
                || t.name.ends_with("feed_forward.w2.weight")
            {
                rng.fill_normal(p, std * resid_scale);
            } else {
                rng.fill_normal(p, std);
            }
        }
    }

    pub fn counts(&self) -> ParamCounts {
        let mut c = ParamCounts {
            total: 0,
            embedding: 0,
            attention: 0,
            ffn: 0,
            norms: 0,
            output: 0,
        };
        for t in &self.layout.tensors {
            let n = t.len();
            c.total += n;
            if t.name.starts_with("tok_embeddings") {
                c.embedding += n;
            } else if t.name == "output.weight" {
                c.output += n;
            } else if t.shape.len() == 1 {
                c.norms += n;
            } else if t.name.contains(".attention.") {
                c.attention += n;
            } else {
                c.ffn += n;
            }
        }
        c
    }

    fn w(&self, off: usize, len: usize) -> &[f32] {
        &self.params[off..off + len]
    }

    /// Forward pass over `tokens: [b, t]`, keeping every activation in `ws`; leaves the logits
    /// in `ws.logits` (`[b·t, V]`).
    pub fn forward(&self, tokens: &[u32], b: usize, t: usize, ws: &mut Workspace) {
        let c = &self.cfg;
        assert_eq!(tokens.len(), b * t, "tokens must be [b, t]");
        assert!(
            t <= c.max_seq_len,
            "sequence length {t} exceeds max_seq_len {}",
            c.max_seq_len
        );
        ws.ensure(c, b, t);
        let n = b * t;
        let (d, hd, f, v) = (c.d_model, c.head_dim, c.ffn_hidden, c.vocab_size);
        let (h, kv) = (c.n_heads, c.n_kv_heads);
        let qd = c.qkv_dim();
        let lay = QkvLayout {
            rs: qd,
            q_off: 0,
            k_off: h * hd,
            v_off: (h + kv) * hd,
        };
        let dims = AttnDims {
            batch: b,
            tq: t,
            tk: t,
            q_pos0: 0,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
        };
        embedding::forward(&mut ws.xs[0], self.w(self.layout.embed, v * d), tokens, d);
        for (l, lo) in self.layout.layers.iter().enumerate() {
            let (before, after) = ws.xs.split_at_mut(l + 1);
            let x = &before[l];
            let xnext = &mut after[0];
            let la = &mut ws.layers[l];
            rmsnorm::forward(
                &mut la.a,
                &mut la.rstd1,
                x,
                self.w(lo.attn_norm, d),
                d,
                c.norm_eps,
            );
            linear_forward(&mut la.qkv, &la.a, self.w(lo.wqkv, qd * d), n, d, qd, false);
            self.rope
                .apply(&mut la.qkv, n, qd, lay.q_off, h, hd, |r| r % t, false);
            self.rope
                .apply(&mut la.qkv, n, qd, lay.k_off, kv, hd, |r| r % t, false);
            let hv = |off| Heads {
                data: &la.qkv,
                rs: qd,
                off,
            };
            attention::forward(
                dims,
                hv(lay.q_off),
                hv(lay.k_off),
                hv(lay.v_off),
                &mut la.o,
                &mut la.lse,
            );
            la.xmid.copy_from_slice(x);
            linear_forward(
                &mut la.xmid,
                &la.o,
                self.w(lo.wo, d * h * hd),
                n,
                h * hd,
                d,
                true,
            );
            rmsnorm::forward(
                &mut la.f,
                &mut la.rstd2,
                &la.xmid,
                self.w(lo.ffn_norm, d),
                d,
                c.norm_eps,
            );
            linear_forward(
                &mut la.h13,
                &la.f,
                self.w(lo.w13, 2 * f * d),
                n,
                d,
                2 * f,
                false,
            );
            swiglu::forward(&mut la.g, &la.h13, f);
            xnext.copy_from_slice(&la.xmid);
            linear_forward(xnext, &la.g, self.w(lo.w2, d * f), n, f, d, true);
        }
        let xl = &ws.xs[c.n_layers];
        rmsnorm::forward(
            &mut ws.hf,
            &mut ws.rstd_f,
            xl,
            self.w(self.layout.norm, d),
            d,
            c.norm_eps,
        );
        linear_forward(
            &mut ws.logits,
            &ws.hf,
            self.w(self.layout.output, v * d),
            n,
            d,
            v,
            false,
        );
    }

    /// Mean cross-entropy of the logits left by [`Model::forward`] (no gradient).
    pub fn loss(&self, targets: &[u32], ws: &mut Workspace) -> f64 {
        let v = self.cfg.vocab_size;
        cross_entropy::forward(&mut ws.losses, &ws.logits, targets, v);
        cross_entropy::sum(&ws.losses) / targets.len() as f64
    }

    /// Forward + backward on one batch: adds `grad_scale · dL/dθ` (L = mean CE over the batch)
    /// into `grads` and returns the (unscaled) mean loss.
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
        assert_eq!(grads.len(), self.layout.total);
        assert_eq!(targets.len(), b * t);
        self.forward(tokens, b, t, ws);
        let c = &self.cfg;
        let n = b * t;
        let (d, hd, f, v) = (c.d_model, c.head_dim, c.ffn_hidden, c.vocab_size);
        let (h, kv) = (c.n_heads, c.n_kv_heads);
        let qd = c.qkv_dim();
        let lay = QkvLayout {
            rs: qd,
            q_off: 0,
            k_off: h * hd,
            v_off: (h + kv) * hd,
        };
        let dims = AttnDims {
            batch: b,
            tq: t,
            tk: t,
            q_pos0: 0,
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
        };
        let ly = &self.layout;

        cross_entropy::forward_backward(
            &mut ws.losses,
            &mut ws.logits,
            targets,
            v,
            grad_scale / n as f32,
        );
        let loss = cross_entropy::sum(&ws.losses) / n as f64;
        // Output projection and final norm. ws.dtmp = dL/dhf.
        let out_w = self.w(ly.output, v * d);
        linear_backward(
            Some((&mut ws.dtmp, false)),
            &mut grads[ly.output..ly.output + v * d],
            &ws.logits,
            &ws.hf,
            out_w,
            n,
            d,
            v,
        );
        rmsnorm::backward(
            &mut ws.dx,
            &mut grads[ly.norm..ly.norm + d],
            &ws.dtmp,
            &ws.xs[c.n_layers],
            self.w(ly.norm, d),
            &ws.rstd_f,
            d,
            false,
        );
        for (l, lo) in ly.layers.iter().enumerate().rev() {
            let la = &ws.layers[l];
            // Feed-forward: x_{l+1} = xmid + g W2ᵀ
            linear_backward(
                Some((&mut ws.dg, false)),
                &mut grads[lo.w2..lo.w2 + d * f],
                &ws.dx,
                &la.g,
                self.w(lo.w2, d * f),
                n,
                f,
                d,
            );
            swiglu::backward(&mut ws.dh13, &ws.dg, &la.h13, f);
            linear_backward(
                Some((&mut ws.dtmp, false)),
                &mut grads[lo.w13..lo.w13 + 2 * f * d],
                &ws.dh13,
                &la.f,
                self.w(lo.w13, 2 * f * d),
                n,
                d,
                2 * f,
            );
            rmsnorm::backward(
                &mut ws.dx,
                &mut grads[lo.ffn_norm..lo.ffn_norm + d],
                &ws.dtmp,
                &la.xmid,
                self.w(lo.ffn_norm, d),
                &la.rstd2,
                d,
                true,
            );
            // Attention: xmid = x + o Woᵀ
            linear_backward(
                Some((&mut ws.dattn, false)),
                &mut grads[lo.wo..lo.wo + d * h * hd],
                &ws.dx,
                &la.o,
                self.w(lo.wo, d * h * hd),
                n,
                h * hd,
                d,
            );
            attention::backward(dims, &la.qkv, lay, &la.o, &la.lse, &ws.dattn, &mut ws.dqkv);
            self.rope
                .apply(&mut ws.dqkv, n, qd, lay.q_off, h, hd, |r| r % t, true);
            self.rope
                .apply(&mut ws.dqkv, n, qd, lay.k_off, kv, hd, |r| r % t, true);
            linear_backward(
                Some((&mut ws.dtmp, false)),
                &mut grads[lo.wqkv..lo.wqkv + qd * d],
                &ws.dqkv,
                &la.a,
                self.w(lo.wqkv, qd * d),
                n,
                d,
                qd,
            );
            rmsnorm::backward(
                &mut ws.dx,
                &mut grads[lo.attn_norm..lo.attn_norm + d],
                &ws.dtmp,
                &ws.xs[l],
                self.w(lo.attn_norm, d),
                &la.rstd1,
                d,
                true,
            );
        }
        embedding::backward(&mut grads[ly.embed..ly.embed + v * d], &ws.dx, tokens, d);
        loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::rope::RopeLayout;

    fn small_cfg(tied: bool, kv: usize, layout: RopeLayout) -> ModelConfig {
        ModelConfig {
            vocab_size: 19,
            d_model: 12,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: kv,
            head_dim: 6,
            rope_theta: 10000.0,
            rope_dim: 4,
            rope_layout: layout,
            ffn_hidden: 10,
            tied_embeddings: tied,
            norm_eps: 1e-5,
            init_std: 0.3,
            max_seq_len: 16,
        }
    }

    #[test]
    fn whole_model_gradient_matches_finite_differences() {
        for (tied, kv, layout) in [
            (true, 2, RopeLayout::Interleaved),
            (false, 1, RopeLayout::Half),
        ] {
            let mut m = Model::new(small_cfg(tied, kv, layout)).unwrap();
            m.init(1);
            // Perturb norms away from 1 so their gradients are exercised generically.
            let mut r = Rng::new(5);
            for t in m.layout.tensors.clone() {
                if t.shape.len() == 1 {
                    for p in &mut m.params[t.range()] {
                        *p += 0.2 * r.normal() as f32;
                    }
                }
            }
            let (b, t) = (2, 5);
            let tokens: Vec<u32> = (0..b * t).map(|i| (i * 7 % 19) as u32).collect();
            let targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % 19) as u32).collect();
            let mut ws = Workspace::default();
            let mut grads = vec![0.0; m.layout.total];
            m.forward_backward(&tokens, &targets, b, t, &mut grads, 1.0, &mut ws);
            let params = m.params.clone();
            let loss = |p: &[f32]| {
                let mm = Model {
                    params: p.to_vec(),
                    ..Model::new(m.cfg.clone()).unwrap()
                };
                let mut ws = Workspace::default();
                mm.forward(&tokens, b, t, &mut ws);
                mm.loss(&targets, &mut ws)
            };
            crate::kernels::gradcheck::check(&params, &grads, loss, 1e-2, 1e-2);
        }
    }
}
