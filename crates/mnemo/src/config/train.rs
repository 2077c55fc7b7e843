//! The settings of a run: [`TrainConfig`] (optimisation and bookkeeping, with its checks and
//! the learning-rate schedule), [`TrainOnly`] (which parameters train) and [`RunConfig`]
//! (model + training + data, saved as `run.json` and inside every checkpoint). The training
//! loop is `crate::train`.

use super::longctx::MIN_CONTEXT;
use super::{CorpusSpec, DsaStage, ModelConfig, SyntheticMix};
pub use crate::kernels::precision::Precision;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Which parameters a run trains (`run.train.train_only`; recorded in a delta's metadata).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainOnly {
    /// Everything (ordinary training).
    #[default]
    #[serde(rename = "all")]
    All,
    /// Only the Engram tables.
    #[serde(rename = "engram")]
    Engram,
    /// The Engram tables and gate parameters.
    #[serde(rename = "engram+gates")]
    EngramGates,
}

impl TrainOnly {
    pub fn is_all(&self) -> bool {
        *self == TrainOnly::All
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(TrainOnly::All),
            "engram" => Ok(TrainOnly::Engram),
            "engram+gates" => Ok(TrainOnly::EngramGates),
            _ => bail!("--train-only {s}: expected `engram` or `engram+gates`"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            TrainOnly::All => "all",
            TrainOnly::Engram => "engram",
            TrainOnly::EngramGates => "engram+gates",
        }
    }
}

/// Optimisation and bookkeeping settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub max_steps: u64,
    /// Peak learning rate (after warm-up).
    pub lr: f32,
    /// Final learning rate of the cosine decay.
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub adam_eps: f32,
    /// Clip the global gradient norm to this value (0 = off).
    pub grad_clip: f32,
    pub log_interval: u64,
    pub eval_interval: u64,
    /// Validation batches (of `batch_size` windows) per evaluation.
    pub eval_batches: usize,
    pub save_interval: u64,
    /// Steps whose checkpoint is kept as `RUN_DIR/checkpoint-step{N}` (hard links to the
    /// files of `checkpoint/`, so keeping costs no copy; a checkpoint is saved at these steps
    /// whatever `save_interval` says). For analysing a run at given points, e.g. the MoE load
    /// right after the lr warm-up. Not written to JSON when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keep_steps: Vec<u64>,
    pub seed: u64,
    /// Bytes of training text used to train the tokenizer when the run trains its own.
    pub tokenizer_max_bytes: u64,
    /// Which parameters are trained: `all`, or only the Engram tables (`engram`) and their
    /// gates (`engram+gates`) with the backbone frozen (memory-only fine-tuning, [`crate::finetune`]).
    #[serde(skip_serializing_if = "TrainOnly::is_all")]
    pub train_only: TrainOnly,
    /// The run whose weights this run started from (`--init`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// DSA models: `dense` (dense attention, everything trains, the indexer learns beside),
    /// `warmup` (dense attention, only the indexer trains) or `sparse` (top-k attention; the
    /// default). Not written to JSON when `sparse`.
    #[serde(skip_serializing_if = "DsaStage::is_sparse")]
    pub dsa_stage: DsaStage,
    /// Replace this share of the training rows with synthetic long-context documents
    /// (needle-in-a-haystack / variable tracking, see `longctx`) tokenized with the run's
    /// tokenizer. Not written to JSON when off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticMix>,
    /// Weight λ of the MTP loss of a model with MTP blocks (DeepSeek-V4's
    /// `num_nextn_predict_layers`, `model::mtp`): the step minimises
    /// `L_main + λ·L_mtp`, `L_mtp` the mean over the blocks of their cross-entropy. 0 turns
    /// the blocks off (not run, not trained: the loss and the gradients are exactly the main
    /// model's). Default 0.3, DeepSeek-V3's λ for its first 10T tokens (0.1 after).
    pub mtp_weight: f32,
    /// Operand precision of the matrix products: `f32` (default) or `bf16` (mixed precision:
    /// bf16 operands, f32 accumulation; master weights, optimizer state, norms, softmax and
    /// loss stay f32). A resumed run keeps it. Not written to JSON when `f32`.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 16,
            seq_len: 128,
            grad_accum: 1,
            max_steps: 500,
            lr: 2e-3,
            min_lr: 2e-4,
            warmup_steps: 50,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-8,
            grad_clip: 1.0,
            log_interval: 10,
            eval_interval: 100,
            eval_batches: 8,
            save_interval: 250,
            keep_steps: Vec::new(),
            seed: 1337,
            tokenizer_max_bytes: 32 << 20,
            train_only: TrainOnly::All,
            init: None,
            dsa_stage: DsaStage::Sparse,
            synthetic: None,
            mtp_weight: 0.3,
            precision: Precision::F32,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        let bad = |f: &str, why: String| anyhow::anyhow!("invalid training config: `{f}` {why}");
        if self.batch_size == 0 {
            return Err(bad("batch_size", "must be > 0".into()));
        }
        if self.seq_len == 0 || self.seq_len > model.max_seq_len {
            return Err(bad(
                "seq_len",
                format!(
                    "({}) must be in 1..={} (the model's max_seq_len)",
                    self.seq_len, model.max_seq_len
                ),
            ));
        }
        if self.grad_accum == 0 {
            return Err(bad("grad_accum", "must be > 0".into()));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad(
                "lr",
                format!("({}) must be a finite number > 0", self.lr),
            ));
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            return Err(bad(
                "min_lr",
                format!("({}) must be in [0, lr]", self.min_lr),
            ));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err(bad("beta1/beta2", "must be in [0, 1)".into()));
        }
        if !self.train_only.is_all() && (self.init.is_none() || model.engram.is_none()) {
            return Err(bad(
                "train_only",
                format!(
                    "({}) needs an Engram model to start from (--init RUN_DIR)",
                    self.train_only.name()
                ),
            ));
        }
        if !model.has_indexer() && !self.dsa_stage.is_sparse() {
            return Err(bad(
                "dsa_stage",
                format!(
                    "({}) applies only to models with a lightning indexer (a `dsa` config, or DeepSeek-V4 CSA layers)",
                    self.dsa_stage.name()
                ),
            ));
        }
        if let Some(sm) = &self.synthetic {
            if !(0.0..=1.0).contains(&sm.fraction) {
                return Err(bad(
                    "synthetic.fraction",
                    format!("({}) must be in [0, 1]", sm.fraction),
                ));
            }
            if self.seq_len < MIN_CONTEXT {
                return Err(bad(
                    "seq_len",
                    format!(
                        "({}) must be at least {} with synthetic documents",
                        self.seq_len, MIN_CONTEXT
                    ),
                ));
            }
        }
        if !(self.mtp_weight.is_finite() && self.mtp_weight >= 0.0) {
            return Err(bad(
                "mtp_weight",
                format!("({}) must be a finite number >= 0", self.mtp_weight),
            ));
        }
        if self.log_interval == 0 || self.eval_interval == 0 || self.save_interval == 0 {
            return Err(bad(
                "log_interval/eval_interval/save_interval",
                "must be > 0".into(),
            ));
        }
        if let Some(&s) = self
            .keep_steps
            .iter()
            .find(|&&s| s == 0 || s > self.max_steps)
        {
            return Err(bad(
                "keep_steps",
                format!(
                    "holds step {s}: kept checkpoints must be at steps 1..={} (max_steps)",
                    self.max_steps
                ),
            ));
        }
        Ok(())
    }

    /// Learning rate at 1-based `step`: linear warm-up to `lr`, then cosine to `min_lr`.
    pub fn lr_at(&self, step: u64) -> f32 {
        if step <= self.warmup_steps {
            return self.lr * step as f32 / self.warmup_steps.max(1) as f32;
        }
        let span = self.max_steps.saturating_sub(self.warmup_steps).max(1);
        let p = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let c = 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
        (self.min_lr as f64 + (self.lr - self.min_lr) as f64 * c) as f32
    }
}

/// Everything that defines a run; saved as `run.json` and inside every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub data: CorpusSpec,
}
