//! Configuration: every serde settings type of the engine, with presets and validation that
//! names the offending field. Pure data: it imports nothing from the crate but the RoPE
//! settings of `kernels` (the engine builds from it, never the other way round).
//!
//! - [`ModelConfig`] (this file): the model, written beside every checkpoint as `config.json`;
//!   its nested settings [`EngramConfig`] (`engram`) and [`DsaConfig`] (`dsa`).
//! - [`train`]: [`TrainConfig`], [`TrainOnly`] and [`RunConfig`] (model + training + data,
//!   saved as `run.json`); [`data`]: [`CorpusSpec`]; [`longctx`]: [`SyntheticMix`]; [`dsa`]:
//!   [`DsaStage`].
//! - [`resolve`]: a run config from a preset, a config file, flags and `--set` overrides.

pub mod data;
pub mod dsa;
pub mod engram;
pub mod longctx;
pub mod resolve;
pub mod train;

pub use data::CorpusSpec;
pub use dsa::{DsaConfig, DsaStage};
pub use engram::EngramConfig;
pub use longctx::{SyntheticLoss, SyntheticMix, Task};
pub use resolve::ConfigSources;
pub use train::{Precision, RunConfig, TrainConfig, TrainOnly};

use crate::kernels::rope::{RopeLayout, RopeScaling, RopeTable};
use serde::{Deserialize, Serialize};

mod mla;
mod v4;
pub use mla::MlaConfig;
pub use v4::{V4Config, V4LayerType, V4Yarn};

/// Shape and hyper-parameters of the dense decoder-only transformer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Vocabulary size (rows of the embedding table).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads: `n_heads` for MHA, fewer for GQA, 1 for MQA. Must divide `n_heads`.
    pub n_kv_heads: usize,
    /// Per-head width (need not equal `d_model / n_heads`).
    pub head_dim: usize,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// RoPE is applied to the leading `rope_dim` dims of each head (even, ≤ head_dim).
    pub rope_dim: usize,
    /// `interleaved` (pairs 2i, 2i+1) or `half` (rotate-half: pairs i, i + rope_dim/2).
    pub rope_layout: RopeLayout,
    /// Hidden width of the SwiGLU feed-forward.
    pub ffn_hidden: usize,
    /// Share the embedding table with the output projection.
    pub tied_embeddings: bool,
    pub norm_eps: f32,
    /// Standard deviation of the normal initialisation (see `Model::init`).
    pub init_std: f32,
    /// Longest sequence (RoPE table size, KV-cache capacity).
    pub max_seq_len: usize,
    /// Biases on the q, k and v projections (Qwen2's attention; see `model::attention_qk`).
    /// Not written to JSON when off.
    #[serde(default, skip_serializing_if = "is_false")]
    pub qkv_bias: bool,
    /// RMSNorm of every query and key head over its `head_dim` values, with one weight
    /// vector for the queries and one for the keys, before RoPE (Qwen3's attention; see
    /// `model::attention_qk`). Not written to JSON when off.
    #[serde(default, skip_serializing_if = "is_false")]
    pub qk_norm: bool,
    /// YaRN RoPE scaling (see `kernels::rope`): scaled frequencies and the attention temperature
    /// `mscale²` ([`ModelConfig::attn_scale`]). `max_seq_len` may not exceed
    /// `original_max_position_embeddings · factor`. Not written to JSON when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,

    // ---- DeepSeekMoE (see `moe.rs`); all optional, dense by default ----
    /// `dense` (SwiGLU of width `ffn_hidden`) or `moe` (DeepSeekMoE from layer `n_dense_layers` on).
    #[serde(default)]
    pub ffn: FfnKind,
    /// The first layers stay dense (width `ffn_hidden`) in an MoE model.
    #[serde(default)]
    pub n_dense_layers: usize,
    /// Always-on SwiGLU experts of width `moe_inter`.
    #[serde(default)]
    pub n_shared_experts: usize,
    /// Fine-grained routed SwiGLU experts of width `moe_inter`.
    #[serde(default)]
    pub n_routed_experts: usize,
    /// Hidden width of each expert.
    #[serde(default)]
    pub moe_inter: usize,
    /// Routed experts per token.
    #[serde(default)]
    pub top_k: usize,
    /// Router score: `sigmoid` (DeepSeek-V3), `sqrtsoftplus` (DeepSeek-V4) or `softmax`
    /// (DeepSeek-V2).
    #[serde(default)]
    pub score_func: ScoreFunc,
    /// Multiplies the routed gate weights.
    #[serde(default = "one")]
    pub routed_scaling_factor: f32,
    /// Normalise the gate weights over the selected experts.
    #[serde(default = "yes")]
    pub norm_topk_prob: bool,
    /// The first `num_hash_layers` MoE layers route by a fixed token-id → experts table.
    #[serde(default)]
    pub num_hash_layers: usize,
    /// Auxiliary-loss-free balancing: per-step move of each expert's selection bias.
    #[serde(default = "default_bias_speed")]
    pub bias_update_speed: f32,
    /// After the sign step, refit the selection bias to the batch just routed with this many
    /// Sinkhorn rounds (0 = DeepSeek's sign step alone). Early in training every token's
    /// router input is nearly the same vector and one fixed-size step per batch cannot follow
    /// the common mode; the refit can. See `moe::fit_bias`.
    #[serde(default)]
    pub bias_fit_iters: usize,
    /// With the refit on: how far the bias moves toward the refitted one per step,
    /// `b ← (1 − r)·b + r·fit(b, last batch)` (1 = jump to it, the original rule). Below 1 the
    /// bias is an exponential moving average of the per-batch fits over ~`1/r` batches: it
    /// tracks the drift of the scores, not one batch's composition. See `moe::refit_bias`.
    #[serde(default = "one")]
    pub bias_fit_rate: f32,
    /// `bias_fit_rate` applies only after this many steps; up to it the refit jumps to each
    /// batch's fit (rate 1). Early in training the router's common mode moves fast and a full
    /// refit ends the routing collapse within a few steps; later the per-batch fit mostly
    /// carries the composition of 8 documents, which an average over ~`1/r` batches removes.
    /// 0 (the default): the rate applies from the first step. A function of the step only,
    /// so resume stays bit-identical.
    #[serde(default)]
    pub bias_fit_rate_after: u64,
    /// With the refit on: score the batch just routed again with the router as updated by
    /// the optimizer step before refitting (its stored inputs, the new router weights), so the
    /// bias does not lag one step of router drift. See `moe::router_scores`.
    #[serde(default)]
    pub bias_fit_rescore: bool,
    /// With the refit on: sweeps of exact per-expert updates on the hard top-k load after the
    /// soft (entropic) fit, which balances soft, not top-k, assignments: each sweep gives
    /// every expert in turn exactly its share of the sample. See `moe::fit_bias`.
    #[serde(default)]
    pub bias_fit_hard_rounds: usize,
    /// With the refit on: fit to the router inputs of the last `bias_fit_window` batches
    /// (micro-batches under gradient accumulation; every `bias_fit_stride`-th token of each;
    /// with `bias_fit_sample`, the last `bias_fit_window` steps' fresh samples instead),
    /// scored by the router as it stands after the optimizer step, instead of to the last
    /// batch alone (0, the default: off). One batch of a few documents is a noisy sample of
    /// the text the next batches bring; the pooled fit estimates the bias that balances the
    /// recent mixture without lagging the router (the pool is re-scored every step). The pool
    /// is part of the optimizer state in the checkpoint, so resume stays bit-identical. It
    /// replaces `bias_fit_rescore` (the pool is always re-scored). See `moe::BiasPool`.
    #[serde(default)]
    pub bias_fit_window: usize,
    /// Keep every `bias_fit_stride`-th token of each batch in the refit pool (1 = all).
    /// Tokens of one window share their document; a stride keeps the pool small while the
    /// window spans many documents.
    #[serde(default = "one_usize")]
    pub bias_fit_stride: usize,
    /// With the pooled refit: after each optimizer step, forward `bias_fit_sample` fresh
    /// windows of training text (`bias_fit_sample_len` tokens each) through the model as the
    /// step left it (routed with the biases before this step's refit) and pool their router
    /// inputs instead of the training batch's (0, the default:
    /// the training batches feed the pool). The batch's inputs were computed by the model
    /// before the step, and those of older batches by older models: at the peak learning
    /// rate, inputs a few steps old route differently enough that a bias fitted to them
    /// leaves held-out text at 3–5× the mean share. Many short windows from many documents
    /// are a better sample than a few long ones for the same forward cost. The sample is
    /// drawn from a stream derived from the seed and the step, so resume stays bit-identical.
    #[serde(default)]
    pub bias_fit_sample: usize,
    /// Tokens per window of `bias_fit_sample`.
    #[serde(default = "default_sample_len")]
    pub bias_fit_sample_len: usize,
    /// Weight of the optional sequence-wise balance loss (0 = off).
    #[serde(default)]
    pub seq_aux_loss_coef: f32,

    // ---- Hyper-connections (see `mhc.rs`); all optional, plain residual by default ----
    /// `plain` (one residual stream), `hc` (Hyper-Connections, arXiv 2409.19606) or `mhc`
    /// (manifold-constrained HC, arXiv 2512.24880). Not written to JSON when `plain`, so plain
    /// configs serialise exactly as before these fields existed.
    #[serde(default, skip_serializing_if = "Residual::is_plain")]
    pub residual: Residual,
    /// Number of residual streams `n` (hc/mhc).
    #[serde(
        default = "default_hc_mult",
        skip_serializing_if = "is_default_hc_mult"
    )]
    pub hc_mult: usize,
    /// Sinkhorn-Knopp iterations of the mHC mixing matrix.
    #[serde(
        default = "default_hc_iters",
        skip_serializing_if = "is_default_hc_iters"
    )]
    pub hc_sinkhorn_iters: usize,
    /// The mHC epsilon (added to `H_pre`, the softmax and every Sinkhorn denominator).
    #[serde(default = "default_hc_eps", skip_serializing_if = "is_default_hc_eps")]
    pub hc_eps: f32,

    // ---- Engram conditional memory (see `engram`); optional, off by default ----
    /// Hashed N-gram memory added to the residual stream(s) before attention in
    /// `engram.layer_ids`. Not written to JSON when off, so older configs load and serialise
    /// as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engram: Option<EngramConfig>,

    // ---- DeepSeek Sparse Attention (see `dsa`); optional, dense attention by default ----
    /// Lightning indexer + top-k sparse attention in every layer. Not written to JSON when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsa: Option<DsaConfig>,
    // ---- DeepSeek-V4 (see `model::attention_v4`); optional ----
    /// The released DeepSeek-V4 attention in every layer (sliding window, compressed entries,
    /// indexer, sinks, grouped low-rank output) instead of GQA. Not written to JSON when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v4: Option<V4Config>,
    /// SwiGLU clamp of every expert (DeepSeek-V4's `swiglu_limit`; 0 = none).
    #[serde(default, skip_serializing_if = "is_zero_f32")]
    pub swiglu_limit: f32,
    // ---- DeepSeek-V2 (see `model::attention_mla`); optional ----
    /// Multi-head latent attention in every layer instead of GQA (inference only). Not
    /// written to JSON when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mla: Option<MlaConfig>,
    /// Group-limited routing: the routed experts form `n_group` equal groups, and each token
    /// picks its `top_k` among the `topk_group` groups with the largest sum of their two best
    /// selection scores (llama.cpp's and DeepSeek-V3's rule). 0 or 1: no groups. Not written to
    /// JSON when 0.
    #[serde(default, skip_serializing_if = "is_zero_usize")]
    pub n_group: usize,
    #[serde(default, skip_serializing_if = "is_zero_usize")]
    pub topk_group: usize,
}

fn is_zero_usize(x: &usize) -> bool {
    *x == 0
}

fn is_false(x: &bool) -> bool {
    !*x
}

fn is_zero_f32(x: &f32) -> bool {
    *x == 0.0
}

/// Residual-stream kind of a model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Residual {
    #[default]
    Plain,
    Hc,
    Mhc,
}

impl Residual {
    pub fn is_plain(&self) -> bool {
        *self == Residual::Plain
    }
}

fn default_hc_mult() -> usize {
    4
}
fn is_default_hc_mult(v: &usize) -> bool {
    *v == default_hc_mult()
}
fn default_hc_iters() -> usize {
    20
}
fn is_default_hc_iters(v: &usize) -> bool {
    *v == default_hc_iters()
}
fn default_hc_eps() -> f32 {
    1e-6
}
fn is_default_hc_eps(v: &f32) -> bool {
    *v == default_hc_eps()
}

/// Feed-forward kind of a model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FfnKind {
    #[default]
    Dense,
    Moe,
}

/// Router score function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreFunc {
    Sigmoid,
    #[default]
    Sqrtsoftplus,
    /// Softmax over all routed experts' logits (DeepSeek-V2).
    Softmax,
}

fn one() -> f32 {
    1.0
}
fn one_usize() -> usize {
    1
}

fn default_sample_len() -> usize {
    32
}

fn yes() -> bool {
    true
}
fn default_bias_speed() -> f32 {
    0.001
}

/// One problem with a config, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("invalid model config: `{field}` {problem}")]
pub struct ConfigError {
    pub field: &'static str,
    pub problem: String,
}

fn err(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        problem: problem.into(),
    }
}

impl ModelConfig {
    /// Names of the built-in presets.
    pub const PRESETS: &'static [&'static str] = &[
        "tiny",
        "small",
        "tiny-moe",
        "small-moe",
        "tiny-hc",
        "tiny-mhc",
        "small-mhc",
        "tiny-engram",
        "tiny-mhc-engram",
        "small-engram",
        "tiny-dsa",
        "small-dsa",
        "v4-tiny",
        "v4-small",
    ];

    /// `tiny`: 4.26M parameters, trains in minutes on 2 cores. `small`: 21.9M parameters, GQA.
    pub fn preset(name: &str) -> Option<ModelConfig> {
        match name {
            "tiny" => Some(ModelConfig {
                vocab_size: 4096,
                d_model: 256,
                n_layers: 4,
                n_heads: 4,
                n_kv_heads: 4,
                head_dim: 64,
                rope_theta: 10000.0,
                rope_dim: 64,
                rope_layout: RopeLayout::Interleaved,
                ffn_hidden: 704,
                tied_embeddings: true,
                norm_eps: 1e-5,
                init_std: 0.02,
                max_seq_len: 256,
                ..Self::dense_defaults()
            }),
            "small" => Some(ModelConfig {
                vocab_size: 8192,
                d_model: 512,
                n_layers: 6,
                n_heads: 8,
                n_kv_heads: 4,
                head_dim: 64,
                rope_theta: 10000.0,
                rope_dim: 64,
                rope_layout: RopeLayout::Interleaved,
                ffn_hidden: 1408,
                tied_embeddings: true,
                norm_eps: 1e-5,
                init_std: 0.02,
                max_seq_len: 512,
                ..Self::dense_defaults()
            }),
            // MoE variants: 1 dense layer, then 1 shared + 16 routed experts, top-2, with the
            // activated FFN width (shared + top_k)·moe_inter equal to the dense `ffn_hidden`.
            // The balancing bias moves 0.01 per step (DeepSeek-V3 uses 0.001 at ~10x lower lr
            // and ~7000x larger batches; at 0.001 our short runs stay collapsed for hundreds of
            // steps, see the README). After the sign step the bias is refitted (16 Sinkhorn
            // rounds, then 8 exact sweeps on the hard top-k load) to the router inputs of a
            // fresh sample: 32 windows of 16 tokens forwarded by the updated model after each
            // step, the last 4 steps' samples pooled and re-scored by the router.
            "tiny-moe" => Some(ModelConfig {
                ffn: FfnKind::Moe,
                n_dense_layers: 1,
                n_shared_experts: 1,
                n_routed_experts: 16,
                moe_inter: 704 / 3,
                top_k: 2,
                bias_update_speed: 0.01,
                bias_fit_iters: 16,
                bias_fit_hard_rounds: 8,
                bias_fit_window: 4,
                bias_fit_stride: 1,
                bias_fit_sample: 32,
                bias_fit_sample_len: 16,
                ..Self::preset("tiny")?
            }),
            "small-moe" => Some(ModelConfig {
                ffn: FfnKind::Moe,
                n_dense_layers: 1,
                n_shared_experts: 1,
                n_routed_experts: 16,
                moe_inter: 1392 / 3,
                top_k: 2,
                bias_update_speed: 0.01,
                bias_fit_iters: 16,
                bias_fit_hard_rounds: 8,
                bias_fit_window: 4,
                bias_fit_stride: 1,
                bias_fit_sample: 32,
                bias_fit_sample_len: 16,
                ffn_hidden: 1392,
                ..Self::preset("small")?
            }),
            // Hyper-connection variants: n = 4 streams (mHC: 20 Sinkhorn iterations).
            "tiny-hc" => Some(ModelConfig {
                residual: Residual::Hc,
                ..Self::preset("tiny")?
            }),
            "tiny-mhc" => Some(ModelConfig {
                residual: Residual::Mhc,
                ..Self::preset("tiny")?
            }),
            "small-mhc" => Some(ModelConfig {
                residual: Residual::Mhc,
                ..Self::preset("small")?
            }),
            // Engram variants: {2,3}-gram memory before attention in blocks 1 (and 3 for
            // `small`), 4 heads per order; `tiny` has 2 × 4 heads × 16 dims × ~10k rows
            // (~5 MB of tables), `small` 2 layers × 8 heads × 32 dims × ~40k rows (~80 MB).
            "tiny-engram" => Some(ModelConfig {
                engram: Some(EngramConfig {
                    layer_ids: vec![1],
                    max_ngram_size: 3,
                    n_head_per_ngram: 4,
                    head_dim: 16,
                    vocab_size_per_ngram: vec![10_000, 10_000],
                    ..Default::default()
                }),
                ..Self::preset("tiny")?
            }),
            "tiny-mhc-engram" => Some(ModelConfig {
                residual: Residual::Mhc,
                ..Self::preset("tiny-engram")?
            }),
            "small-engram" => Some(ModelConfig {
                engram: Some(EngramConfig {
                    layer_ids: vec![1, 3],
                    max_ngram_size: 3,
                    n_head_per_ngram: 4,
                    head_dim: 32,
                    vocab_size_per_ngram: vec![40_000, 40_000],
                    ..Default::default()
                }),
                ..Self::preset("small")?
            }),
            // DSA variants. The indexer costs H_I·d_I MACs per (query, key) pair against
            // 2·H·d_h for attention: tiny 4·16 = 64 vs 512 (8x), small 4·32 = 128 vs 1024
            // (8x). tiny's top-16 makes sparsity matter at its 256-token windows; small's
            // top-512 is meant for long contexts (raise max_seq_len).
            "tiny-dsa" => Some(ModelConfig {
                dsa: Some(DsaConfig {
                    index_n_heads: 4,
                    index_head_dim: 16,
                    index_rope_dim: 8,
                    index_topk: 16,
                }),
                ..Self::preset("tiny")?
            }),
            "small-dsa" => Some(ModelConfig {
                dsa: Some(DsaConfig {
                    index_n_heads: 4,
                    index_head_dim: 32,
                    index_rope_dim: 16,
                    index_topk: 512,
                }),
                ..Self::preset("small")?
            }),
            // The released DeepSeek-V4 architecture at small scale: mHC (4 streams), V4
            // attention (sliding window; CSA with its indexer and HCA layers alternating),
            // DeepSeekMoE with one hash layer, sqrtsoftplus routing and the SwiGLU clamp; the
            // balancing rules of the MoE presets; one MTP block (sliding, as released; trained
            // with `train.mtp_weight`: ~1.3–1.4x the CPU time of a step without it at these
            // depths, `--set train.mtp_weight=0` skips it, docs/deepseek-v4.md).
            "v4-tiny" => Some(ModelConfig {
                tied_embeddings: false,
                n_kv_heads: 1,
                ffn_hidden: 704 / 3,
                n_dense_layers: 0,
                num_hash_layers: 1,
                residual: Residual::Mhc,
                rope_dim: 0,
                swiglu_limit: 10.0,
                v4: Some(V4Config {
                    q_lora_rank: 128,
                    o_lora_rank: 64,
                    o_groups: 2,
                    sliding_window: 64,
                    layer_types: vec![
                        V4LayerType::SlidingAttention,
                        V4LayerType::CompressedSparseAttention,
                        V4LayerType::HeavilyCompressedAttention,
                        V4LayerType::CompressedSparseAttention,
                        // The MTP block: sliding, as in the released models.
                        V4LayerType::SlidingAttention,
                    ],
                    compress_rate_csa: 4,
                    compress_rate_hca: 16,
                    index_n_heads: 4,
                    index_head_dim: 32,
                    index_topk: 16,
                    qk_rope_head_dim: 16,
                    compress_rope_theta: 160000.0,
                    compress_rope_scaling: None,
                    num_nextn_predict_layers: 1,
                }),
                ..Self::preset("tiny-moe")?
            }),
            "v4-small" => Some(ModelConfig {
                tied_embeddings: false,
                n_kv_heads: 1,
                ffn_hidden: 1392 / 3,
                n_dense_layers: 0,
                num_hash_layers: 1,
                residual: Residual::Mhc,
                rope_dim: 0,
                swiglu_limit: 10.0,
                v4: Some(V4Config {
                    q_lora_rank: 256,
                    o_lora_rank: 128,
                    o_groups: 4,
                    sliding_window: 128,
                    layer_types: vec![
                        V4LayerType::SlidingAttention,
                        V4LayerType::CompressedSparseAttention,
                        V4LayerType::HeavilyCompressedAttention,
                        V4LayerType::CompressedSparseAttention,
                        V4LayerType::HeavilyCompressedAttention,
                        V4LayerType::CompressedSparseAttention,
                        // The MTP block: sliding, as in the released models.
                        V4LayerType::SlidingAttention,
                    ],
                    compress_rate_csa: 4,
                    compress_rate_hca: 32,
                    index_n_heads: 4,
                    index_head_dim: 32,
                    index_topk: 32,
                    qk_rope_head_dim: 16,
                    compress_rope_theta: 160000.0,
                    compress_rope_scaling: None,
                    num_nextn_predict_layers: 1,
                }),
                ..Self::preset("small-moe")?
            }),
            _ => None,
        }
    }

    /// The MoE fields of a dense model (used with struct-update syntax).
    pub fn dense_defaults() -> ModelConfig {
        ModelConfig {
            vocab_size: 0,
            d_model: 0,
            n_layers: 0,
            n_heads: 0,
            n_kv_heads: 0,
            head_dim: 0,
            rope_theta: 10000.0,
            rope_dim: 0,
            rope_layout: RopeLayout::Interleaved,
            ffn_hidden: 0,
            tied_embeddings: true,
            norm_eps: 1e-5,
            init_std: 0.02,
            max_seq_len: 0,
            qkv_bias: false,
            qk_norm: false,
            rope_scaling: None,
            ffn: FfnKind::Dense,
            n_dense_layers: 0,
            n_shared_experts: 0,
            n_routed_experts: 0,
            moe_inter: 0,
            top_k: 0,
            score_func: ScoreFunc::Sqrtsoftplus,
            routed_scaling_factor: 1.0,
            norm_topk_prob: true,
            num_hash_layers: 0,
            bias_update_speed: 0.001,
            bias_fit_iters: 0,
            bias_fit_rate: 1.0,
            bias_fit_rate_after: 0,
            bias_fit_rescore: false,
            bias_fit_hard_rounds: 0,
            bias_fit_window: 0,
            bias_fit_stride: 1,
            bias_fit_sample: 0,
            bias_fit_sample_len: default_sample_len(),
            seq_aux_loss_coef: 0.0,
            residual: Residual::Plain,
            hc_mult: default_hc_mult(),
            hc_sinkhorn_iters: default_hc_iters(),
            hc_eps: default_hc_eps(),
            engram: None,
            dsa: None,
            v4: None,
            swiglu_limit: 0.0,
            mla: None,
            n_group: 0,
            topk_group: 0,
        }
    }

    /// The fields left out of the JSON of a plain-residual config, with their defaults (so a
    /// `--set residual=mhc` override can find them).
    pub fn optional_fields() -> Vec<(&'static str, serde_json::Value)> {
        vec![
            ("residual", serde_json::json!("plain")),
            ("hc_mult", serde_json::json!(default_hc_mult())),
            ("hc_sinkhorn_iters", serde_json::json!(default_hc_iters())),
            ("hc_eps", serde_json::json!(default_hc_eps())),
            ("engram", serde_json::Value::Null),
            ("dsa", serde_json::Value::Null),
            ("rope_scaling", serde_json::Value::Null),
        ]
    }

    /// Layers with a lightning indexer: every layer of a DSA model, the CSA layers of a
    /// DeepSeek-V4 model (0: no indexer, so no DSA training stages).
    pub fn n_indexer_layers(&self) -> usize {
        match (&self.dsa, &self.v4) {
            (Some(_), _) => self.n_layers,
            (None, Some(v)) => (0..self.n_layers)
                .filter(|&l| v.layer_types[l] == V4LayerType::CompressedSparseAttention)
                .count(),
            _ => 0,
        }
    }

    /// Whether the model has a lightning indexer to train (DSA, or DeepSeek-V4 with CSA).
    pub fn has_indexer(&self) -> bool {
        self.n_indexer_layers() > 0
    }

    /// MTP blocks (`v4.num_nextn_predict_layers`; 0 without the DeepSeek-V4 attention).
    pub fn mtp_layers(&self) -> usize {
        self.v4.as_ref().map_or(0, |v| v.num_nextn_predict_layers)
    }

    /// Blocks in the parameter layout: the `n_layers` main layers, then the MTP blocks (block
    /// `n_layers + j` is MTP block `j`: an MoE block, never hash-routed).
    pub fn n_blocks(&self) -> usize {
        self.n_layers + self.mtp_layers()
    }

    /// The config without its MTP blocks (what transformers' checkpoints hold).
    pub fn without_mtp(&self) -> ModelConfig {
        let mut c = self.clone();
        if let Some(v) = c.v4.as_mut() {
            v.layer_types.truncate(self.n_layers);
            v.num_nextn_predict_layers = 0;
        }
        c
    }

    /// Whether layer `l` has an MoE feed-forward.
    pub fn is_moe(&self, l: usize) -> bool {
        self.ffn == FfnKind::Moe && l >= self.n_dense_layers
    }

    /// Whether layer `l` routes by the token-id hash table.
    pub fn is_hash(&self, l: usize) -> bool {
        l < self.n_layers && self.is_moe(l) && l - self.n_dense_layers < self.num_hash_layers
    }

    /// Check every shape constraint; the error names the field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let pos = |v: usize, f: &'static str| {
            if v == 0 {
                Err(err(f, "must be > 0"))
            } else {
                Ok(())
            }
        };
        pos(self.vocab_size, "vocab_size")?;
        pos(self.d_model, "d_model")?;
        pos(self.n_layers, "n_layers")?;
        pos(self.n_heads, "n_heads")?;
        pos(self.n_kv_heads, "n_kv_heads")?;
        pos(self.head_dim, "head_dim")?;
        pos(self.ffn_hidden, "ffn_hidden")?;
        pos(self.max_seq_len, "max_seq_len")?;
        if let Some(m) = &self.mla {
            self.validate_mla(m)?;
        }
        if let Some(v) = &self.v4 {
            self.validate_v4(v)?;
            for (on, f) in [(self.qkv_bias, "qkv_bias"), (self.qk_norm, "qk_norm")] {
                if on {
                    return Err(err(f, "applies to GQA attention, not DeepSeek-V4's (v4)"));
                }
            }
        }
        if self.vocab_size >= u32::MAX as usize {
            // u32::MAX is the ignored-target sentinel (`cross_entropy::IGNORE`).
            return Err(err(
                "vocab_size",
                "must be below 2^32 - 1 (ids fit in 32 bits, u32::MAX marks an ignored target)",
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(err(
                "n_kv_heads",
                format!(
                    "({}) must divide n_heads ({})",
                    self.n_kv_heads, self.n_heads
                ),
            ));
        }
        if !self.rope_dim.is_multiple_of(2) || self.rope_dim > self.head_dim {
            return Err(err(
                "rope_dim",
                format!(
                    "({}) must be even and at most head_dim ({})",
                    self.rope_dim, self.head_dim
                ),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return Err(err(
                "rope_theta",
                format!("({}) must be a finite number > 1", self.rope_theta),
            ));
        }
        if let Some(rs) = &self.rope_scaling {
            self.validate_rope_scaling(rs)?;
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(err("norm_eps", "must be a finite number > 0"));
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return Err(err("init_std", "must be a finite number > 0"));
        }
        if self.ffn == FfnKind::Moe {
            self.validate_moe()?;
        }
        if self.residual != Residual::Plain {
            if self.hc_mult == 0 {
                return Err(err(
                    "hc_mult",
                    "must be >= 1 for residual = \"hc\" or \"mhc\"",
                ));
            }
            if self.residual == Residual::Mhc && self.hc_sinkhorn_iters == 0 {
                return Err(err(
                    "hc_sinkhorn_iters",
                    "must be >= 1 for residual = \"mhc\"",
                ));
            }
            if !(self.hc_eps.is_finite() && self.hc_eps >= 0.0) {
                return Err(err("hc_eps", "must be a finite number >= 0"));
            }
        }
        if let Some(e) = &self.engram {
            // The Engram error already names its sub-field (`engram.layer_ids: …`).
            e.validate(Some(self.n_layers))
                .map_err(|x| err("engram", format!("is inconsistent: {x}")))?;
        }
        if let Some(x) = &self.dsa {
            self.validate_dsa(x)?;
        }
        Ok(())
    }

    fn validate_dsa(&self, x: &DsaConfig) -> Result<(), ConfigError> {
        if x.index_topk == 0 {
            return Err(err(
                "dsa.index_topk",
                "must be > 0 (keys attended per query)",
            ));
        }
        if x.index_n_heads == 0 {
            return Err(err("dsa.index_n_heads", "must be > 0"));
        }
        if x.index_head_dim == 0 {
            return Err(err("dsa.index_head_dim", "must be > 0"));
        }
        if !x.index_rope_dim.is_multiple_of(2) || x.index_rope_dim > x.index_head_dim {
            return Err(err(
                "dsa.index_rope_dim",
                format!(
                    "({}) must be even and at most dsa.index_head_dim ({})",
                    x.index_rope_dim, x.index_head_dim
                ),
            ));
        }
        if self
            .rope_scaling
            .as_ref()
            .is_some_and(|r| r.mscale() != 1.0)
        {
            // The sparse attention and indexer-loss kernels use the plain 1/√d_h scale.
            return Err(err(
                "dsa",
                "cannot be combined with rope_scaling whose attention mscale ≠ 1 (yet); set rope_scaling.mscale = 0 for scaled frequencies with the plain softmax scale",
            ));
        }
        Ok(())
    }

    fn validate_rope_scaling(&self, rs: &RopeScaling) -> Result<(), ConfigError> {
        if !(rs.factor.is_finite() && rs.factor >= 1.0) {
            return Err(err(
                "rope_scaling.factor",
                format!("({}) must be a finite number >= 1", rs.factor),
            ));
        }
        if rs.original_max_position_embeddings == 0 {
            return Err(err(
                "rope_scaling.original_max_position_embeddings",
                "must be > 0",
            ));
        }
        if !(rs.beta_slow.is_finite()
            && rs.beta_fast.is_finite()
            && rs.beta_slow > 0.0
            && rs.beta_fast > rs.beta_slow)
        {
            return Err(err(
                "rope_scaling.beta_fast",
                format!(
                    "({}) must be > rope_scaling.beta_slow ({}) > 0",
                    rs.beta_fast, rs.beta_slow
                ),
            ));
        }
        if !(rs.mscale.is_finite() && rs.mscale >= 0.0) {
            return Err(err(
                "rope_scaling.mscale",
                format!("({}) must be a finite number >= 0", rs.mscale),
            ));
        }
        if self.max_seq_len > rs.max_context() {
            return Err(err(
                "max_seq_len",
                format!(
                    "({}) is beyond what the RoPE scaling reaches: \
                     rope_scaling.original_max_position_embeddings ({}) × rope_scaling.factor ({}) = {}; \
                     raise rope_scaling.factor or lower max_seq_len",
                    self.max_seq_len,
                    rs.original_max_position_embeddings,
                    rs.factor,
                    rs.max_context()
                ),
            ));
        }
        Ok(())
    }

    /// Softmax scale of the attention logits: `1/√head_dim`, times DeepSeek's `mscale²` when
    /// YaRN scaling is on (`MLA.__init__`: `softmax_scale * mscale * mscale`).
    pub fn attn_scale(&self) -> f32 {
        let m = self.rope_scaling.as_ref().map_or(1.0, |r| r.mscale());
        (m * m / (self.head_dim as f64).sqrt()) as f32
    }

    /// The RoPE table of this config (`max_seq_len` positions, YaRN frequencies when scaled).
    pub fn rope_table(&self) -> RopeTable {
        RopeTable::with_scaling(
            self.rope_dim,
            self.rope_theta,
            self.max_seq_len,
            self.rope_layout,
            self.rope_scaling.as_ref(),
        )
    }

    fn validate_moe(&self) -> Result<(), ConfigError> {
        let e = self.n_routed_experts;
        if e == 0 {
            return Err(err(
                "n_routed_experts",
                "must be > 0 for an MoE model (ffn = \"moe\")",
            ));
        }
        if self.top_k == 0 || self.top_k > e {
            return Err(err(
                "top_k",
                format!("({}) must be in 1..=n_routed_experts ({e})", self.top_k),
            ));
        }
        if self.moe_inter == 0 {
            return Err(err("moe_inter", "must be > 0 for an MoE model"));
        }
        if self.n_group > 1 {
            let g = self.n_group;
            if !e.is_multiple_of(g) {
                return Err(err(
                    "n_group",
                    format!("({g}) must divide n_routed_experts ({e})"),
                ));
            }
            if self.topk_group == 0 || self.topk_group > g {
                return Err(err(
                    "topk_group",
                    format!("({}) must be in 1..=n_group ({g})", self.topk_group),
                ));
            }
            if self.top_k > self.topk_group * (e / g) {
                return Err(err(
                    "top_k",
                    format!(
                        "({}) exceeds the experts of the topk_group ({}) groups kept ({} each)",
                        self.top_k,
                        self.topk_group,
                        e / g
                    ),
                ));
            }
        }
        if self.n_dense_layers > self.n_layers {
            return Err(err(
                "n_dense_layers",
                format!(
                    "({}) exceeds n_layers ({})",
                    self.n_dense_layers, self.n_layers
                ),
            ));
        }
        if self.num_hash_layers > self.n_layers - self.n_dense_layers {
            return Err(err(
                "num_hash_layers",
                format!(
                    "({}) exceeds the number of MoE layers ({})",
                    self.num_hash_layers,
                    self.n_layers - self.n_dense_layers
                ),
            ));
        }
        if !(self.routed_scaling_factor.is_finite() && self.routed_scaling_factor > 0.0) {
            return Err(err("routed_scaling_factor", "must be a finite number > 0"));
        }
        if !(self.bias_update_speed.is_finite() && self.bias_update_speed >= 0.0) {
            return Err(err("bias_update_speed", "must be a finite number >= 0"));
        }
        if self.bias_fit_iters > 1000 {
            return Err(err("bias_fit_iters", "must be at most 1000"));
        }
        if self.bias_fit_hard_rounds > 1000 {
            return Err(err("bias_fit_hard_rounds", "must be at most 1000"));
        }
        if self.bias_fit_window > 4096 {
            return Err(err("bias_fit_window", "must be at most 4096 batches"));
        }
        if self.bias_fit_stride == 0 || self.bias_fit_stride > 65536 {
            return Err(err("bias_fit_stride", "must be in 1..=65536"));
        }
        if self.bias_fit_sample > 4096 {
            return Err(err("bias_fit_sample", "must be at most 4096 windows"));
        }
        if self.bias_fit_sample > 0 && self.bias_fit_window == 0 {
            return Err(err(
                "bias_fit_sample",
                "feeds the refit pool, which is off (bias_fit_window = 0): set bias_fit_window >= 1 (steps of samples kept) or bias_fit_sample = 0",
            ));
        }
        if self.bias_fit_sample > 0
            && (self.bias_fit_sample_len == 0 || self.bias_fit_sample_len > self.max_seq_len)
        {
            return Err(err(
                "bias_fit_sample_len",
                format!("must be in 1..=max_seq_len ({})", self.max_seq_len),
            ));
        }
        if self
            .bias_fit_sample
            .saturating_mul(self.bias_fit_sample_len)
            > 65536
        {
            return Err(err(
                "bias_fit_sample",
                format!(
                    "times bias_fit_sample_len is {} tokens forwarded per step; at most 65536",
                    self.bias_fit_sample
                        .saturating_mul(self.bias_fit_sample_len)
                ),
            ));
        }
        if self.bias_fit_window > 0 && self.bias_fit_iters == 0 {
            return Err(err(
                "bias_fit_window",
                "pools batches for the refit, which is off (bias_fit_iters = 0): set bias_fit_iters > 0 or bias_fit_window = 0",
            ));
        }
        if !(self.bias_fit_rate.is_finite()
            && self.bias_fit_rate > 0.0
            && self.bias_fit_rate <= 1.0)
        {
            return Err(err("bias_fit_rate", "must be in (0, 1]"));
        }
        if !(self.seq_aux_loss_coef.is_finite() && self.seq_aux_loss_coef >= 0.0) {
            return Err(err("seq_aux_loss_coef", "must be a finite number >= 0"));
        }
        Ok(())
    }

    /// Width of the fused `[q | k | v]` projection.
    pub fn qkv_dim(&self) -> usize {
        (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
    }

    /// Model FLOPs of one training step (forward + backward) on `b` sequences of `t` tokens:
    /// 2 FLOPs per multiply-add of every matmul, ×3 for forward + backward; causal attention
    /// counts the visible half of the score matrix. MTP blocks count as trained (a
    /// `train.mtp_weight` > 0).
    pub fn train_flops(&self, b: usize, t: usize) -> f64 {
        let n = (b * t) as f64;
        let (d, hd) = (self.d_model as f64, self.head_dim as f64);
        let (h, f, v) = (
            self.n_heads as f64,
            self.ffn_hidden as f64,
            self.vocab_size as f64,
        );
        // Causal attention sees t(t+1)/2 (query, key) pairs per sequence; DSA's sparse
        // attention Σ_t min(k, t+1), plus its indexer (projections and all causal pairs).
        let causal_pairs = (t as f64) * (t as f64 + 1.0) / 2.0;
        let (pairs, indexer) = match &self.dsa {
            None => (causal_pairs, 0.0),
            Some(x) => {
                let k = x.index_topk.min(t);
                let sparse = (k * (k + 1) / 2 + (t - k) * k) as f64;
                let (hi, di) = (x.index_n_heads as f64, x.index_head_dim as f64);
                let proj = 2.0 * n * d * (hi * di + di + hi);
                (sparse, proj + 2.0 * (b as f64) * causal_pairs * hi * di)
            }
        };
        let attn = 2.0 * n * d * self.qkv_dim() as f64
            + 2.0 * n * h * hd * d
            + 2.0 * 2.0 * (b as f64) * h * pairs * hd
            + indexer;
        let dense_ffn = 2.0 * n * d * 2.0 * f + 2.0 * n * f * d;
        // MoE: the router plus the activated experts (shared + top_k) of width moe_inter.
        let mi = self.moe_inter as f64;
        let active = (self.n_shared_experts + self.top_k) as f64;
        let moe_ffn = 2.0 * n * d * self.n_routed_experts as f64
            + active * (2.0 * n * d * 2.0 * mi + 2.0 * n * mi * d);
        // MTP blocks: one more block each, its two input projections (the hidden one per
        // stream) and one more output head.
        let streams = if self.residual.is_plain() {
            1.0
        } else {
            self.hc_mult as f64
        };
        let layers: f64 = (0..self.n_blocks())
            .map(|l| attn + if self.is_moe(l) { moe_ffn } else { dense_ffn })
            .sum();
        let mtp = self.mtp_layers() as f64 * (2.0 * n * d * d * (1.0 + streams) + 2.0 * n * d * v);
        3.0 * (layers + mtp + 2.0 * n * d * v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_bad_shapes_name_their_field() {
        for p in ModelConfig::PRESETS {
            ModelConfig::preset(p).unwrap().validate().unwrap();
        }
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.n_kv_heads = 3;
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "n_kv_heads");
        assert!(e.to_string().contains("must divide n_heads"));
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.rope_dim = 65;
        assert_eq!(c.validate().unwrap_err().field, "rope_dim");
        let mut c = ModelConfig::preset("tiny-mhc").unwrap();
        c.hc_mult = 0;
        assert_eq!(c.validate().unwrap_err().field, "hc_mult");
        let mut c = ModelConfig::preset("tiny-mhc").unwrap();
        c.hc_sinkhorn_iters = 0;
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "hc_sinkhorn_iters");
        assert!(e.to_string().contains("hc_sinkhorn_iters"), "{e}");
        // Plain configs do not mention the hyper-connection fields, and old JSON loads as plain.
        let plain = serde_json::to_string(&ModelConfig::preset("tiny").unwrap()).unwrap();
        assert!(
            !plain.contains("hc_") && !plain.contains("residual"),
            "{plain}"
        );
        let back: ModelConfig = serde_json::from_str(&plain).unwrap();
        assert_eq!(back.residual, Residual::Plain);
        let m = serde_json::to_string(&ModelConfig::preset("tiny-mhc").unwrap()).unwrap();
        assert!(m.contains(r#""residual":"mhc""#), "{m}");
        // Engram: absent from plain JSON, bad layer ids name the sub-field.
        assert!(!plain.contains("engram"), "{plain}");
        assert!(back.engram.is_none());
        let mut c = ModelConfig::preset("tiny-engram").unwrap();
        c.engram.as_mut().unwrap().layer_ids = vec![1, 4];
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "engram");
        assert!(
            e.to_string().contains("engram.layer_ids") && e.to_string().contains("block 4"),
            "{e}"
        );
        let mut c = ModelConfig::preset("tiny-engram").unwrap();
        c.engram.as_mut().unwrap().vocab_size_per_ngram = vec![10];
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("engram.vocab_size_per_ngram"));
        let j = serde_json::to_string(&ModelConfig::preset("tiny-engram").unwrap()).unwrap();
        let back: ModelConfig = serde_json::from_str(&j).unwrap();
        assert_eq!(back, ModelConfig::preset("tiny-engram").unwrap());
        // DSA: absent from plain JSON; bad values name the field.
        assert!(!plain.contains("dsa"), "{plain}");
        let j = serde_json::to_string(&ModelConfig::preset("tiny-dsa").unwrap()).unwrap();
        assert!(j.contains(r#""index_topk":16"#), "{j}");
        let back: ModelConfig = serde_json::from_str(&j).unwrap();
        assert_eq!(back, ModelConfig::preset("tiny-dsa").unwrap());
        let dsa_err = |f: fn(&mut ModelConfig)| {
            let mut c = ModelConfig::preset("tiny-dsa").unwrap();
            f(&mut c);
            c.validate().unwrap_err()
        };
        let e = dsa_err(|c| c.dsa.as_mut().unwrap().index_topk = 0);
        assert_eq!(e.field, "dsa.index_topk");
        assert_eq!(
            dsa_err(|c| c.dsa.as_mut().unwrap().index_n_heads = 0).field,
            "dsa.index_n_heads"
        );
        assert_eq!(
            dsa_err(|c| c.dsa.as_mut().unwrap().index_head_dim = 0).field,
            "dsa.index_head_dim"
        );
        assert_eq!(
            dsa_err(|c| c.dsa.as_mut().unwrap().index_rope_dim = 3).field,
            "dsa.index_rope_dim"
        );
        assert_eq!(
            dsa_err(|c| c.dsa.as_mut().unwrap().index_rope_dim = 18).field,
            "dsa.index_rope_dim"
        );
        // DSA composes with hyper-connections and Engram (one block, module `model::block`).
        let mut c = ModelConfig::preset("tiny-dsa").unwrap();
        c.residual = Residual::Mhc;
        c.engram = ModelConfig::preset("tiny-engram").unwrap().engram;
        c.validate().unwrap();
        // RoPE scaling: absent from plain JSON, must reach max_seq_len, named on error.
        assert!(!plain.contains("rope_scaling"), "{plain}");
        let mut c = ModelConfig::preset("tiny").unwrap();
        c.max_seq_len = 1024;
        c.rope_scaling = Some(RopeScaling::yarn(2.0, 256));
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "max_seq_len");
        let s = e.to_string();
        assert!(
            s.contains("rope_scaling.original_max_position_embeddings (256)")
                && s.contains("rope_scaling.factor (2)")
                && s.contains("= 512"),
            "{s}"
        );
        c.rope_scaling = Some(RopeScaling::yarn(4.0, 256));
        c.validate().unwrap();
        let m = 0.1 * 4f64.ln() + 1.0;
        assert!((c.attn_scale() as f64 - m * m / 8.0).abs() < 1e-7);
        assert_eq!(ModelConfig::preset("tiny").unwrap().attn_scale(), 0.125);
        let j = serde_json::to_string(&c).unwrap();
        assert!(j.contains(r#""rope_scaling":{"factor":4.0"#), "{j}");
        assert_eq!(serde_json::from_str::<ModelConfig>(&j).unwrap(), c);
        c.rope_scaling = Some(RopeScaling::yarn(0.5, 256));
        assert_eq!(c.validate().unwrap_err().field, "rope_scaling.factor");
        let bad = r#"{"vocab_size": 1, "d_modle": 3}"#;
        let e = serde_json::from_str::<ModelConfig>(bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("d_modle"), "{e}");
    }
}
