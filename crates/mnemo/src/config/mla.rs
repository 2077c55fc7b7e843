//! Multi-head latent attention settings (`ModelConfig::mla`, DeepSeek-V2 / V2-Lite; module
//! `model::attention_mla`), named as DeepSeek-V2's `config.json` names them, and their checks.
//!
//! The other MLA shapes are the model's own fields: `n_heads` query heads, the RoPE width
//! `rope_dim` (`qk_rope_head_dim`, shared by all heads' keys), `head_dim` =
//! `qk_nope_head_dim + qk_rope_head_dim` (the width the softmax scale divides by), and the
//! YaRN `rope_scaling` whose `mscale` is DeepSeek's `mscale_all_dim`.

use super::{err, ConfigError, ModelConfig};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlaConfig {
    /// 0: the query is one projection `a·W_qᵀ` (V2-Lite); > 0: `RMSNorm(a·W_qaᵀ)·W_qbᵀ`.
    #[serde(default)]
    pub q_lora_rank: usize,
    /// Width of the compressed key/value latent `c` (what the cache keeps per token).
    pub kv_lora_rank: usize,
    /// Per-head key/query channels without RoPE (decompressed from `c`).
    pub qk_nope_head_dim: usize,
    /// Per-head value width (decompressed from `c`).
    pub v_head_dim: usize,
}

impl ModelConfig {
    pub(super) fn validate_mla(&self, m: &MlaConfig) -> Result<(), ConfigError> {
        for (v, f) in [
            (m.kv_lora_rank, "mla.kv_lora_rank"),
            (m.qk_nope_head_dim, "mla.qk_nope_head_dim"),
            (m.v_head_dim, "mla.v_head_dim"),
            (self.rope_dim, "rope_dim"),
        ] {
            if v == 0 {
                return Err(err(f, "must be > 0 with multi-head latent attention (mla)"));
            }
        }
        if self.head_dim != m.qk_nope_head_dim + self.rope_dim {
            return Err(err(
                "head_dim",
                format!(
                    "({}) must be mla.qk_nope_head_dim ({}) + rope_dim ({}) with multi-head \
                     latent attention",
                    self.head_dim, m.qk_nope_head_dim, self.rope_dim
                ),
            ));
        }
        if self.n_kv_heads != self.n_heads {
            return Err(err(
                "n_kv_heads",
                format!(
                    "({}) must equal n_heads ({}) with multi-head latent attention (every head \
                     decompresses its own keys and values from the shared latent)",
                    self.n_kv_heads, self.n_heads
                ),
            ));
        }
        for (on, f) in [
            (self.qkv_bias, "qkv_bias"),
            (self.qk_norm, "qk_norm"),
            (self.dsa.is_some(), "dsa"),
            (self.v4.is_some(), "v4"),
            (self.engram.is_some(), "engram"),
        ] {
            if on {
                return Err(err(
                    f,
                    "cannot be combined with multi-head latent attention (mla)",
                ));
            }
        }
        if !self.residual.is_plain() {
            return Err(err(
                "residual",
                "must be plain with multi-head latent attention (mla)",
            ));
        }
        Ok(())
    }
}
