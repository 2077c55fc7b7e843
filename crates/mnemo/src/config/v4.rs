//! DeepSeek-V4's attention settings (`ModelConfig::v4`), named as transformers'
//! `DeepseekV4Config` names them, and their checks.

use super::{err, ConfigError, FfnKind, ModelConfig, Residual};
use serde::{Deserialize, Serialize};

/// The attention of one DeepSeek-V4 layer (`layer_types` of transformers' `DeepseekV4Config`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum V4LayerType {
    /// Sliding-window attention only.
    SlidingAttention,
    /// CSA: overlapping compressed entries (ratio `compress_rate_csa`) chosen by the indexer.
    CompressedSparseAttention,
    /// HCA: non-overlapping compressed entries (ratio `compress_rate_hca`), all attended.
    HeavilyCompressedAttention,
}

/// YaRN of the compressed layers' rotary embedding (transformers' `rope_parameters.compress`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct V4Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// Scale of cos and sin (1 = no mscale, as the official code and a legacy flat
    /// `rope_scaling` give; transformers computes `0.1 ln f + 1` for a nested set without it).
    pub attention_factor: f64,
}

/// DeepSeek-V4's attention settings, named as transformers' `DeepseekV4Config` names them
/// (`docs/deepseek-v4-equations.md` §1). The query heads, head width (`head_dim`), `rope_theta`
/// of the sliding layers and `norm_eps` are the model's own fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct V4Config {
    pub q_lora_rank: usize,
    pub o_lora_rank: usize,
    pub o_groups: usize,
    /// Window keys a query sees, itself included.
    pub sliding_window: usize,
    /// One per layer, then one per MTP block (the official `compress_ratios` convention: the
    /// released models' MTP block is `sliding_attention`).
    pub layer_types: Vec<V4LayerType>,
    pub compress_rate_csa: usize,
    pub compress_rate_hca: usize,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    /// Rotary channels: the last `qk_rope_head_dim` of each head (and indexer head).
    pub qk_rope_head_dim: usize,
    /// RoPE base of the compressed layers (and their entries and indexer).
    pub compress_rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress_rope_scaling: Option<V4Yarn>,
    /// MTP blocks (multi-token prediction, `mtp.{j}.*`, module `model::mtp`): block `j`
    /// predicts the token `j + 2` ahead from the main model's last streams (or block `j − 1`'s)
    /// and the embedding of the token `j + 1` ahead; trained as an auxiliary loss
    /// (`train.mtp_weight`). The released models have 1. Not written to JSON when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_nextn_predict_layers: usize,
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}

impl V4Config {
    /// Tokens per compressed entry of layer `l` (0: sliding only).
    pub fn ratio(&self, l: usize) -> usize {
        match self.layer_types[l] {
            V4LayerType::SlidingAttention => 0,
            V4LayerType::CompressedSparseAttention => self.compress_rate_csa,
            V4LayerType::HeavilyCompressedAttention => self.compress_rate_hca,
        }
    }
}

impl ModelConfig {
    pub(super) fn validate_v4(&self, v: &V4Config) -> Result<(), ConfigError> {
        let mtp = v.num_nextn_predict_layers;
        if v.layer_types.len() != self.n_layers + mtp {
            return Err(err(
                "v4.layer_types",
                if mtp == 0 {
                    format!(
                        "has {} entries for {} layers",
                        v.layer_types.len(),
                        self.n_layers
                    )
                } else {
                    format!(
                        "has {} entries for {} layers + {mtp} MTP blocks (one per layer, then one per MTP block; the released models' MTP block is sliding_attention)",
                        v.layer_types.len(),
                        self.n_layers
                    )
                },
            ));
        }
        for (f, x) in [
            ("v4.q_lora_rank", v.q_lora_rank),
            ("v4.o_lora_rank", v.o_lora_rank),
            ("v4.o_groups", v.o_groups),
            ("v4.sliding_window", v.sliding_window),
            ("v4.compress_rate_csa", v.compress_rate_csa),
            ("v4.compress_rate_hca", v.compress_rate_hca),
            ("v4.index_n_heads", v.index_n_heads),
            ("v4.index_head_dim", v.index_head_dim),
        ] {
            if x == 0 {
                return Err(err(f, "must be > 0"));
            }
        }
        if !(self.n_heads * self.head_dim).is_multiple_of(v.o_groups) {
            return Err(err(
                "v4.o_groups",
                format!(
                    "({}) must divide n_heads · head_dim ({})",
                    v.o_groups,
                    self.n_heads * self.head_dim
                ),
            ));
        }
        let r = v.qk_rope_head_dim;
        if !r.is_multiple_of(2) || r > self.head_dim || r > v.index_head_dim {
            return Err(err(
                "v4.qk_rope_head_dim",
                format!(
                    "({r}) must be even and at most head_dim ({}) and index_head_dim ({})",
                    self.head_dim, v.index_head_dim
                ),
            ));
        }
        if self.residual != Residual::Mhc || self.ffn != FfnKind::Moe || self.dsa.is_some() {
            return Err(err(
                "v4",
                "DeepSeek-V4 attention goes with residual = \"mhc\", ffn = \"moe\" and no dsa",
            ));
        }
        if self.engram.is_some() {
            return Err(err(
                "v4",
                "Engram with the DeepSeek-V4 attention is not built yet",
            ));
        }
        Ok(())
    }
}
