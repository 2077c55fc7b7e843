//! [`EngramConfig`]: the settings of Engram conditional memory (`model.engram`; the memory
//! itself is `crate::engram`). Pure data and its checks: the gate and optimizer settings it
//! implies are built by `crate::engram` (`EngramConfig::gate_spec`, `table_optimizer`).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

fn default_gate_eps() -> f32 {
    f32::EPSILON
}
fn default_conv_eps() -> f32 {
    1e-5
}
fn default_lr_mult() -> f32 {
    5.0
}
fn default_table_std() -> f32 {
    1.0
}

/// Engram settings (the demo's `EngramConfig`, scaled down by default). Fields left out of a
/// config (e.g. `--set 'engram={"layer_ids":[1]}'`) take the defaults below.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngramConfig {
    /// 0-based blocks that get an Engram module (demo `[1, 15]`).
    pub layer_ids: Vec<usize>,
    /// Largest N-gram order `N`; orders `2..=N` (demo 3).
    pub max_ngram_size: usize,
    /// Hash heads per order `K` (demo 8).
    pub n_head_per_ngram: usize,
    /// Embedding width of one head `D_h` (demo 64 = `n_embed_per_ngram / K` = 512 / 8).
    pub head_dim: usize,
    /// Per order (2..=N): where the prime search for each head's table size starts (demo
    /// `129280·5` for both orders). Each head's table has about this many rows.
    pub vocab_size_per_ngram: Vec<u64>,
    /// Short-convolution kernel (demo 4); 0 = no convolution (DeepSeek-V4.1).
    pub kernel_size: usize,
    /// Hash multiplier seed (layer `l` uses `seed + 10007·l`).
    pub seed: u64,
    /// RAW tokenizer id used before a document's start, mapped through the compression (demo 2,
    /// DeepSeek-V3's id; mnemo tokenizers have their end-of-text token at 0).
    pub pad_id: u32,
    /// Table learning rate = this × the base learning rate (paper: 5).
    #[serde(default = "default_lr_mult")]
    pub table_lr_mult: f32,
    /// Standard deviation of the table init (demo: `nn.Embedding`'s N(0, 1)).
    #[serde(default = "default_table_std")]
    pub table_init_std: f32,
    /// ε of the key/query RMSNorms (demo: f32 machine ε).
    #[serde(default = "default_gate_eps")]
    pub gate_norm_eps: f32,
    /// ε of the branch RMSNorms before the convolution (demo 1e-5).
    #[serde(default = "default_conv_eps")]
    pub conv_norm_eps: f32,
}

impl Default for EngramConfig {
    fn default() -> Self {
        EngramConfig {
            layer_ids: vec![1],
            max_ngram_size: 3,
            n_head_per_ngram: 4,
            head_dim: 16,
            vocab_size_per_ngram: vec![50_000, 50_000],
            kernel_size: 4,
            seed: 0,
            pad_id: 0,
            table_lr_mult: default_lr_mult(),
            table_init_std: default_table_std(),
            gate_norm_eps: default_gate_eps(),
            conv_norm_eps: default_conv_eps(),
        }
    }
}

impl EngramConfig {
    /// Checks the settings on their own (`n_layers`: the model's depth, when known).
    pub fn validate(&self, n_layers: Option<usize>) -> Result<()> {
        let e = |field: &str, msg: String| -> Result<()> { bail!("engram.{field}: {msg}") };
        if self.max_ngram_size < 2 {
            e(
                "max_ngram_size",
                format!(
                    "is {}; Engram hashes N-grams of orders 2..=N, so N must be ≥ 2",
                    self.max_ngram_size
                ),
            )?;
        }
        if self.max_ngram_size > 16 {
            e(
                "max_ngram_size",
                format!("is {}; at most 16 is supported", self.max_ngram_size),
            )?;
        }
        if self.n_head_per_ngram == 0 {
            e("n_head_per_ngram", "must be ≥ 1".into())?;
        }
        if self.head_dim == 0 {
            e("head_dim", "must be ≥ 1".into())?;
        }
        if self.layer_ids.is_empty() {
            e(
                "layer_ids",
                "is empty; list the blocks that get an Engram module".into(),
            )?;
        }
        let mut ids = self.layer_ids.clone();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            e(
                "layer_ids",
                format!("{:?} lists a block twice", self.layer_ids),
            )?;
        }
        if let (Some(n), Some(&max)) = (n_layers, ids.last()) {
            if max >= n {
                e(
                    "layer_ids",
                    format!("block {max} does not exist in a model of {n} layers"),
                )?;
            }
        }
        if self.vocab_size_per_ngram.len() != self.max_ngram_size - 1 {
            e(
                "vocab_size_per_ngram",
                format!(
                    "has {} entries; one per order 2..={} ({}) is needed",
                    self.vocab_size_per_ngram.len(),
                    self.max_ngram_size,
                    self.max_ngram_size - 1
                ),
            )?;
        }
        if let Some(v) = self
            .vocab_size_per_ngram
            .iter()
            .find(|&&v| !(2..=1 << 31).contains(&v))
        {
            e("vocab_size_per_ngram", format!("{v} is outside 2..=2^31"))?;
        }
        let rows: u64 =
            self.vocab_size_per_ngram.iter().sum::<u64>() * self.n_head_per_ngram as u64;
        if rows > u32::MAX as u64 / 2 {
            e(
                "vocab_size_per_ngram",
                format!("{rows} rows per layer exceed the u32 row index"),
            )?;
        }
        if self.kernel_size > 64 {
            e(
                "kernel_size",
                format!("is {}; at most 64", self.kernel_size),
            )?;
        }
        for (f, v) in [
            ("table_lr_mult", self.table_lr_mult),
            ("table_init_std", self.table_init_std),
            ("gate_norm_eps", self.gate_norm_eps),
            ("conv_norm_eps", self.conv_norm_eps),
        ] {
            if !(v.is_finite() && v > 0.0) {
                e(f, format!("is {v}; must be a finite number > 0"))?;
            }
        }
        Ok(())
    }

    /// Heads per layer `H = (N−1)·K`.
    pub fn n_heads(&self) -> usize {
        (self.max_ngram_size - 1) * self.n_head_per_ngram
    }

    /// Memory width `d_mem = H·D_h`.
    pub fn d_mem(&self) -> usize {
        self.n_heads() * self.head_dim
    }
}
