//! The DeepSeek Sparse Attention settings: [`DsaConfig`] (`model.dsa`, the indexer's shape)
//! and [`DsaStage`] (`train.dsa_stage`). The indexer and its training are `crate::dsa`.

use serde::{Deserialize, Serialize};

/// DeepSeek Sparse Attention (DeepSeek-V3.2): a lightning indexer per layer scores every
/// earlier token, `I(t,s) = Σ_j w(t,j)·ReLU(q_I(t,j)·k_I(s))`, and each query attends only to
/// its `index_topk` best-scoring keys (shared by all heads). See `crate::dsa`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DsaConfig {
    /// Indexer heads `H_I`.
    pub index_n_heads: usize,
    /// Indexer head width `d_I` (also the width of the single indexer key per token).
    pub index_head_dim: usize,
    /// Rotate-half RoPE on the first `index_rope_dim` dims of each indexer q head and of k
    /// (pe first, then nope), same θ as the model.
    pub index_rope_dim: usize,
    /// Keys attended per query `k` (all of them while `t + 1 ≤ k`).
    pub index_topk: usize,
}

/// Training stage of a DSA model (spec §5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DsaStage {
    /// Dense attention, everything trains: the model on the LM loss, the indexer (input
    /// detached) on its KL to the dense attention. Pre-training from scratch before the
    /// paper's recipe, which starts from a trained dense model.
    Dense,
    /// Dense attention; only the indexer trains, on the KL to the dense attention (every other
    /// parameter frozen).
    Warmup,
    /// Top-k sparse attention; the model trains on the LM loss, the indexer on its KL over
    /// the selected set.
    #[default]
    Sparse,
}

impl DsaStage {
    pub fn is_sparse(&self) -> bool {
        *self == DsaStage::Sparse
    }
    pub fn name(&self) -> &'static str {
        match self {
            DsaStage::Dense => "dense",
            DsaStage::Warmup => "warmup",
            DsaStage::Sparse => "sparse",
        }
    }
}

impl std::str::FromStr for DsaStage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dense" => Ok(DsaStage::Dense),
            "warmup" => Ok(DsaStage::Warmup),
            "sparse" => Ok(DsaStage::Sparse),
            _ => Err(format!(
                "unknown DSA stage `{s}` (expected dense, warmup or sparse)"
            )),
        }
    }
}
