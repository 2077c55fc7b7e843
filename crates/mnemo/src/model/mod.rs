//! The decoder-only transformer ("V4-mini"): one block, many drivers.
//!
//! ```text
//! h = E[tokens]                                                    [N, d]   (N = B·T)
//! x⁰ = expand(h)                                                   [N, w]   (w = d, or n·d)
//! block l:  x ← x + Engram(x)                    (layers in engram.layer_ids)
//!           x ← R(x, Attn ∘ RMSNorm)             Attn = dense | DSA     (GQA, partial RoPE)
//!           x ← R(x, FFN ∘ RMSNorm)              FFN  = SwiGLU | DeepSeekMoE
//! logits = RMSNorm(collapse(xᴸ))·Woutᵀ          (Wout = E when embeddings are tied)  [N, V]
//! loss = mean CE(logits, targets)   over the targets ≠ cross_entropy::IGNORE (masked rows: 0
//!                                     loss, 0 gradient; the mean divides by the counted ones)
//! ```
//!
//! `R` is the residual strategy (`residual` = plain | hc | mhc, module [`residual`]): plain
//! `x + F(RMSNorm(x))`; with hyper-connections `n = hc_mult` streams `[N, n, d]` (module
//! [`crate::mhc`]), expanded once after the embedding, each sublayer reading
//! `y = Σ_j H_pre[j]·x[j]` and merging `x ← H_resᵀ-mix(x) + H_post ⊗ F(RMSNorm(y))`, collapsed
//! once before the final norm (mHC head or HC sum).
//!
//! Every combination of residual × attention × feed-forward × Engram is the same block
//! ([`block`]); each sublayer is one forward/backward pair ([`attention`], [`ffn`],
//! [`engram_layer`]). Drivers only decide where keys and values come from and which rows run:
//! - [`training`]: a batch `[B, T]` attending to itself; keeps every activation in a
//!   [`Workspace`] and runs the backward pass ([`Model::forward_backward`]).
//! - [`decode`]: rows of one or many sequences, each with its own [`KvCache`]: prefill,
//!   one-token decoding, batched serving, lookup verification ([`Model::forward_batch`],
//!   [`Model::forward_cached`]).
//!
//! DeepSeek-V4's MTP blocks ([`mtp`]) are more blocks of the same code after the main model
//! (block `n_layers + j`), run by the training driver on its last streams.
//!
//! A frozen-backbone backward (`Workspace::frozen_backbone`, memory-only fine-tuning)
//! propagates only `dL/dh` (no `dW = dYᵀ·X` GEMMs of the frozen linear weights, no embedding
//! gradient; MoE experts, hyper-connections and the O(d) norm weights still compute theirs) and
//! stops after the lowest Engram block: the gate and table gradients are exactly the full ones.
//!
//! All parameters live in one flat `Vec<f32>` (and the gradients in one of the same layout,
//! [`layout`]), so the optimiser and gradient clipping are single loops. Within a layer
//! `wq, wk, wv` are adjacent and so form one `[(H+2KV)·d_h, d]` matrix (one GEMM for q, k and
//! v); `w1, w3` likewise form `[2F, d]`. Linear weights are stored `[out, in]` as in PyTorch.
//!
//! **Initialisation** ([`Model::init`]): every matrix and the embedding ~ N(0, init_std²); the
//! two projections that write into the residual stream (`wo`, `w2`) are further scaled by
//! `1/√(2·n_layers)` (GPT-2); RMSNorm weights are 1.

pub mod attention;
pub mod attention_dsa;
pub mod attention_mla;
pub mod attention_qk;
pub mod attention_v4;
pub mod attention_v4_cache;
pub mod attention_v4_indexer;
pub mod attention_v4_rope;
pub mod block;
pub mod cache;
pub mod decode;
pub mod engram_layer;
pub mod ffn;
pub mod layout;
mod moe_balance;
pub mod mtp;
pub mod mtp_decode;
pub mod numerics;
pub mod params;
pub mod residual;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_compose;
#[cfg(test)]
mod tests_mtp;
#[cfg(test)]
mod tests_quant_prefill;
pub mod training;
pub mod workspace;

pub use cache::{CacheOptions, KvCache, PREFILL_CHUNK};
pub use layout::{
    engram_gate_spec, is_engram_tensor, is_hc_tensor, is_indexer_tensor, is_mtp_tensor, Ffn,
    LayerOffsets, MtpOffsets, ParamCounts, ParamLayout, TensorSpec,
};
pub use params::Params;
pub use workspace::Workspace;

use crate::config::ModelConfig;
use crate::dsa;
use crate::engram::{CompressedTokenizer, Engram};
use crate::kernels::rope::RopeTable;
use crate::mhc::{self, HcDims};
use crate::rng::Rng;

/// The model: config, flat parameters, their layout, and the RoPE table.
pub struct Model {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub params: Params,
    pub rope: RopeTable,
    /// Token id → experts table `[V, top_k]` of each hash-routed MoE layer (`None` elsewhere),
    /// one per block (`n_blocks()`: the MTP blocks are never hash-routed).
    pub hash_tables: Vec<Option<Vec<u32>>>,
    /// Quantised copies of linear weights (keyed by their offset in `params`, possibly spanning
    /// a fused range such as q|k|v), used by one-token decoding when present (GGUF models;
    /// an official DeepSeek-V4 checkpoint's FP8/FP4 weights kept packed, `io::v4_packed`,
    /// which its attention projections and MoE experts read).
    pub quant: std::collections::HashMap<usize, crate::kernels::quant::QMatrix>,
    /// Quantised copies of fused weights whose parts have different block types (a GGUF
    /// q|k|v or gate|up quantised part by part: `kernels::qparts`), keyed as `quant`; used
    /// where `quant` has no entry.
    pub quant_parts: std::collections::HashMap<usize, Vec<crate::kernels::quant::QMatrix>>,
    /// The weights in `quant` have no f32 copy in `params` (their ranges are never written:
    /// `io::v4_packed`): every row of every product reads the quantised copy, prefill
    /// included, and the f32-only drivers (training, the full forward) refuse the model.
    pub packed_only: bool,
    /// Engram memory (`cfg.engram`): compression, hashes and tables. Its gate parameters live
    /// in `params` (`layout.engram_gate`); `EngramLayer::params` is only a copy for saving
    /// ([`Model::sync_engram_gates`]).
    pub engram: Option<Engram>,
    /// End-of-text id of the tokenizer: Engram's hash and convolution restart after it.
    pub engram_eot: Option<u32>,
    /// Rotate-half RoPE table of the DSA indexer (`cfg.dsa`; dims `0..index_rope_dim`).
    pub index_rope: Option<RopeTable>,
    /// Per block: the rounding ggml applies to its routed experts' inputs (to `w1|w3`, to `w2`)
    /// when llama.cpp's numerics are asked for (`io::gguf::deepseek4::use_ggml_numerics`);
    /// empty: exact f32 products (the default).
    pub moe_act_quant: Vec<[Option<crate::kernels::act_quant::ActQuant>; 5]>,
    /// llama.cpp's numerics: the input rounding of the product whose weight sits at this
    /// offset (`Model::lin`; empty: exact f32), set with `moe_act_quant`.
    pub act_quant_at: std::collections::HashMap<usize, crate::kernels::act_quant::ActQuant>,
    /// DeepSeek's official inference numerics (`--numerics official`, module [`numerics`]):
    /// FP8 round trips of the K = V rows and entries, the indexer's Hadamard + FP4, routed
    /// experts weighted before `w2` (with `act_quant_at` / `moe_act_quant` set to FP8).
    pub official_numerics: bool,
}

impl Model {
    /// The `len` parameters at offset `off`.
    pub(crate) fn w(&self, off: usize, len: usize) -> &[f32] {
        &self.params[off..off + len]
    }

    /// A model with all-zero parameters (call [`Model::init`] or load weights).
    pub fn new(cfg: ModelConfig) -> Result<Self, crate::config::ConfigError> {
        Self::new_in(cfg, |n| Ok(Params::zeros(n)))
    }

    /// [`Model::new`] with the parameters in a reserved mapping ([`Params::reserved`]): for a
    /// model whose big weights will live packed in [`Model::quant`] (`io::v4_packed`).
    pub fn new_reserved(cfg: ModelConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        let n = ParamLayout::new(&cfg).total;
        Self::new_in(cfg, |n| {
            Params::reserved(n).map_err(|e| crate::config::ConfigError {
                field: "params",
                problem: format!("cannot reserve {n} f32 of address space: {e}"),
            })
        })
        .with_context(|| format!("a model of {n} parameters"))
    }

    fn new_in(
        cfg: ModelConfig,
        params: impl FnOnce(usize) -> Result<Params, crate::config::ConfigError>,
    ) -> Result<Self, crate::config::ConfigError> {
        cfg.validate()?;
        let layout = ParamLayout::new(&cfg);
        let rope = cfg.rope_table();
        let hash_tables = (0..cfg.n_blocks())
            .map(|l| {
                cfg.is_hash(l)
                    .then(|| hash_table(cfg.vocab_size, cfg.n_routed_experts, cfg.top_k, &mut None))
            })
            .collect();
        // A placeholder Engram (identity compression over the model vocabulary) until
        // `init_engram` gives it the tokenizer's compression or a checkpoint replaces it.
        let engram = match &cfg.engram {
            Some(ec) => {
                let ident = CompressedTokenizer::from_lookup((0..cfg.vocab_size as u32).collect())
                    .map_err(|e| crate::config::ConfigError {
                        field: "engram",
                        problem: format!("{e:#}"),
                    })?;
                let nb = if cfg.residual.is_plain() {
                    1
                } else {
                    cfg.hc_mult
                };
                Some(
                    Engram::new(ec.clone(), ident, cfg.d_model, nb, 0, cfg.init_std).map_err(
                        |e| crate::config::ConfigError {
                            field: "engram",
                            problem: format!("{e:#}"),
                        },
                    )?,
                )
            }
            None => None,
        };
        let index_rope = dsa::rope_table(&cfg);
        Ok(Model {
            params: params(layout.total)?,
            layout,
            rope,
            cfg,
            hash_tables,
            quant: Default::default(),
            quant_parts: Default::default(),
            packed_only: false,
            engram,
            engram_eot: None,
            index_rope,
            moe_act_quant: Vec::new(),
            act_quant_at: Default::default(),
            official_numerics: false,
        })
    }

    /// (Re)initialise the Engram memory with the tokenizer compression `compress`: multipliers
    /// drawn for its `V'`, tables and gates from `seed` (gates copied into `params`).
    pub fn init_engram(&mut self, compress: CompressedTokenizer, seed: u64) -> anyhow::Result<()> {
        let Some(ec) = self.cfg.engram.clone() else {
            anyhow::bail!("the model has no Engram config");
        };
        let nb = engram_gate_spec(&self.cfg).n_branch;
        let e = Engram::new(ec, compress, self.cfg.d_model, nb, seed, self.cfg.init_std)?;
        for (l, &o) in e.layers.iter().zip(&self.layout.engram_gate) {
            self.params[o..o + l.params.len()].copy_from_slice(&l.params);
        }
        self.engram = Some(e);
        Ok(())
    }

    /// The gate parameters of Engram layer `i` (in the flat buffer).
    pub fn engram_gate_params(&self, i: usize) -> &[f32] {
        let o = self.layout.engram_gate[i];
        let n = self.engram.as_ref().expect("engram").layers[i]
            .gate
            .n_params();
        &self.params[o..o + n]
    }

    /// Copy the gate parameters from the flat buffer into the Engram layers (before saving
    /// the Engram file).
    pub fn sync_engram_gates(&mut self) {
        let Some(e) = self.engram.as_mut() else {
            return;
        };
        for (l, &o) in e.layers.iter_mut().zip(&self.layout.engram_gate) {
            let n = l.params.len();
            l.params.copy_from_slice(&self.params[o..o + n]);
        }
    }

    /// Engram: an error if a memory-mapped table's file vanished or changed size (call before
    /// a forward pass, which cannot return an error).
    pub fn check_engram_tables(&self) -> anyhow::Result<()> {
        if let Some(e) = &self.engram {
            for l in &e.layers {
                l.table.check()?;
            }
        }
        Ok(())
    }

    /// Engram: token ids must lie inside the compression table (the tokenizer's range).
    pub fn check_engram_tokens(&self, tokens: &[u32]) -> anyhow::Result<()> {
        if let Some(e) = &self.engram {
            let v = e.compress.tokenizer_vocab_size();
            if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
                anyhow::bail!(
                    "token id {bad} is outside the tokenizer's range 0..{v} (the Engram compression table)"
                );
            }
        }
        Ok(())
    }

    /// The documented initialisation (module docs), fully determined by `seed`.
    pub fn init(&mut self, seed: u64) {
        let mut rng = Rng::derived(seed, "init");
        let std = self.cfg.init_std;
        let resid_scale = 1.0 / (2.0 * self.cfg.n_layers as f32).sqrt();
        for t in &self.layout.tensors {
            let p = &mut self.params[t.range()];
            if is_hc_tensor(&t.name) || is_engram_tensor(&t.name) {
                continue; // below
            } else if !t.trainable
                || t.name.ends_with("indexer.k_norm.bias")
                || t.name.ends_with("attn.attn_sink")
                || attention_qk::is_qkv_bias(&t.name)
            {
                p.fill(0.0); // MoE selection bias, LayerNorm bias, attention sinks, q/k/v biases
            } else if t.shape.len() == 1 {
                p.fill(1.0);
            } else if t.name.ends_with("attention.wo.weight")
                || t.name.ends_with("attn.wo_b.weight")
                || t.name.ends_with("w2.weight")
            {
                rng.fill_normal(p, std * resid_scale);
            } else {
                rng.fill_normal(p, std);
            }
        }
        if let Some(dm) = HcDims::from_config(&self.cfg) {
            // The main model's, then the MTP blocks' from a stream of their own: a model with
            // MTP blocks starts from the same main model as one without.
            let nl = self.cfg.n_layers;
            let mut rng = Rng::derived(seed, "hyper-connections");
            let mut mtp_rng = Rng::derived(seed, "mtp-hyper-connections");
            for (l, lo) in self.layout.layers.iter().enumerate() {
                let r = if l < nl { &mut rng } else { &mut mtp_rng };
                let mut normal = |p: &mut [f32]| r.fill_normal(p, std);
                for (s, o) in [(2 * l, lo.attn_hc), (2 * l + 1, lo.ffn_hc)] {
                    if let Some(o) = o {
                        mhc::init_layer(&dm, &mut self.params, o, s, false, &mut normal);
                    }
                }
            }
            let heads = self.layout.hc_head.iter().map(|&o| (o, false));
            let mtp_heads = self.layout.mtp.iter().filter_map(|m| m.hc_head);
            for (o, is_mtp) in heads.chain(mtp_heads.map(|o| (o, true))) {
                let r = if is_mtp { &mut mtp_rng } else { &mut rng };
                let mut normal = |p: &mut [f32]| r.fill_normal(p, std);
                mhc::init_layer(&dm, &mut self.params, o, 0, true, &mut normal);
            }
        }
        if let Some(e) = self.engram.take() {
            self.init_engram(e.compress, seed)
                .expect("a validated Engram config initialises");
        }
        let mut rng = Some(Rng::derived(seed, "tid2eid"));
        let c = &self.cfg;
        for (l, tab) in self.hash_tables.iter_mut().enumerate() {
            if c.is_hash(l) {
                *tab = Some(hash_table(
                    c.vocab_size,
                    c.n_routed_experts,
                    c.top_k,
                    &mut rng,
                ));
            }
        }
    }

    pub fn counts(&self) -> ParamCounts {
        let mut c = ParamCounts {
            total: 0,
            activated: 0,
            embedding: 0,
            attention: 0,
            dense_ffn: 0,
            router: 0,
            shared_experts: 0,
            routed_experts: 0,
            norms: 0,
            output: 0,
            hyper_connections: 0,
            engram_gates: 0,
            engram_tables: 0,
            mtp: 0,
        };
        for t in &self.layout.tensors {
            let n = t.len();
            c.total += n;
            let slot = if is_mtp_tensor(&t.name) {
                &mut c.mtp
            } else if is_engram_tensor(&t.name) {
                &mut c.engram_gates
            } else if is_hc_tensor(&t.name) {
                &mut c.hyper_connections
            } else if t.name.starts_with("tok_embeddings") {
                &mut c.embedding
            } else if t.name == "output.weight" {
                &mut c.output
            } else if t.name.contains(".ffn.gate.") {
                &mut c.router
            } else if t.shape.len() == 1 {
                &mut c.norms
            } else if t.name.contains(".attention.")
                || t.name.contains(".indexer.")
                || t.name.contains(".attn.")
            {
                &mut c.attention
            } else if t.name.contains(".shared_experts.") {
                &mut c.shared_experts
            } else if t.name.contains(".experts.") {
                &mut c.routed_experts
            } else {
                &mut c.dense_ffn
            };
            *slot += n;
        }
        let k_over_e = if self.cfg.n_routed_experts > 0 {
            self.cfg.top_k as f64 / self.cfg.n_routed_experts as f64
        } else {
            0.0
        };
        c.activated = c.total - c.mtp - c.routed_experts
            + (c.routed_experts as f64 * k_over_e).round() as usize;
        if let Some(e) = &self.engram {
            c.engram_tables = e
                .layers
                .iter()
                .map(|l| l.table.rows() * l.table.dim())
                .sum();
            // Each token reads H rows of D_h per layer.
            c.activated += e.layers.len() * e.cfg.d_mem();
        }
        c
    }
}

/// A token → `k` distinct experts table `[V, k]`: uniform without replacement from `rng`
/// (all zeros when `rng` is `None`: a placeholder that loading or `init` replaces).
fn hash_table(v: usize, e: usize, k: usize, rng: &mut Option<Rng>) -> Vec<u32> {
    let mut tab = vec![0u32; v * k];
    let Some(rng) = rng else {
        for row in tab.chunks_mut(k) {
            for (j, x) in row.iter_mut().enumerate() {
                *x = j as u32;
            }
        }
        return tab;
    };
    let mut perm: Vec<u32> = (0..e as u32).collect();
    for row in tab.chunks_mut(k) {
        for j in 0..k {
            let r = j + rng.below((e - j) as u64) as usize;
            perm.swap(j, r);
            row[j] = perm[j];
        }
    }
    tab
}
