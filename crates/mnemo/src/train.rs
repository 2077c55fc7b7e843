//! The training loop: AdamW with warm-up + cosine schedule, gradient clipping and
//! accumulation, periodic validation (loss and bits per byte), JSONL metrics with a loss-curve
//! PNG, atomic checkpoints, bit-identical resumption, and a clean stop on request (Ctrl-C).
//!
//! Determinism: every kernel reduces in a fixed order that does not depend on thread
//! scheduling, the data windows come from a seeded [`Rng`] saved in the checkpoint, and
//! `metrics.jsonl` holds only values that are functions of (config, seed, step) — timings go to
//! the progress bar, not the file. So a run resumed from step `s` writes the same bytes for
//! steps `> s` as an uninterrupted run.

use crate::checkpoint::{self, TrainState};
use crate::config::ModelConfig;
use crate::data::{self, CorpusSpec, TokenSplit};
use crate::dsa::{DsaRun, DsaStage, DsaStats};
use crate::engram::{SparseAdam, SparseGrad};
use crate::finetune::{DeltaBase, TrainOnly};
use crate::kernels::adamw::{self, AdamWParams};
use crate::kernels::cross_entropy;
use crate::longctx::SyntheticMix;
use crate::model::{Model, Workspace};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use crate::util::{det_sum_sq, human_count};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

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
        if model.dsa.is_none() && !self.dsa_stage.is_sparse() {
            return Err(bad(
                "dsa_stage",
                format!(
                    "({}) applies only to DSA models (the model has no `dsa` config)",
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
            if self.seq_len < crate::longctx::MIN_CONTEXT {
                return Err(bad(
                    "seq_len",
                    format!(
                        "({}) must be at least {} with synthetic documents",
                        self.seq_len,
                        crate::longctx::MIN_CONTEXT
                    ),
                ));
            }
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

/// How a `train` invocation starts.
pub enum Start {
    /// A new run: fails if the run directory already holds a checkpoint.
    Fresh {
        run: Box<RunConfig>,
        /// Use this tokenizer instead of training one on the data.
        tokenizer: Option<PathBuf>,
        /// Start from this run's weights (not its optimizer state or step): a new stage such
        /// as a long-context continuation with a longer `max_seq_len` and RoPE scaling. Its
        /// tokenizer is used unless `tokenizer` is given.
        init: Option<PathBuf>,
    },
    /// A new run whose model (weights, tokenizer, Engram tables) is loaded from the run
    /// `run.train.init`, with fresh optimizer state; `run.model` is replaced by that run's model
    /// config. With `run.train.train_only` = `engram`/`engram+gates` only the memory is trained
    /// and `engram_delta.safetensors` is written beside each checkpoint.
    Init { run: Box<RunConfig> },
    /// Continue from `out/checkpoint` with the run's own config; `max_steps` may change the
    /// step budget (and with it the cosine schedule from here on), `dsa_stage` the DSA
    /// training stage (e.g. warmup → sparse).
    Resume {
        max_steps: Option<u64>,
        dsa_stage: Option<DsaStage>,
    },
}

/// Options of one `train` invocation.
pub struct TrainOptions {
    pub out: PathBuf,
    pub start: Start,
    pub cache_root: PathBuf,
    pub progress: bool,
}

/// Result of a finished (or stopped) run.
#[derive(Debug, Serialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub final_loss: f64,
    pub val_loss: Option<f64>,
    pub val_bpb: Option<f64>,
    pub unigram_entropy: f64,
    pub stopped_early: bool,
    pub tokens_per_s: f64,
}

/// Validation loss (nats/token) and bits per byte over fixed windows of `split`.
pub fn evaluate(
    model: &Model,
    split: &TokenSplit,
    b: usize,
    t: usize,
    batches: usize,
    ws: &mut Workspace,
) -> Option<(f64, f64)> {
    evaluate_with(model, split, b, t, batches, ws, None).map(|e| (e.loss, e.bpb))
}

/// What [`evaluate_with`] measures over the validation windows.
#[derive(Clone, Debug)]
pub struct EvalOut {
    /// Mean loss, nats/token.
    pub loss: f64,
    /// Bits per byte of the raw text.
    pub bpb: f64,
    /// DSA models in a training mode: indexer KL and recall averaged over the batches.
    pub dsa: Option<DsaStats>,
    /// Per layer (`None` for dense layers): tokens each routed expert received over all the
    /// validation windows, routed with the current bias (the bias itself is not touched). This
    /// is the *global* expert load of DeepSeek's auxiliary-loss-free balancing paper (MaxVio
    /// on held-out text), independent of the composition of one small training batch.
    pub moe_loads: Vec<Option<Vec<u64>>>,
}

/// [`evaluate`], also returning the indexer KL and recall of a DSA model in a training mode
/// (`run`: dense or sparse attention) and the expert load of MoE layers over all windows.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_with(
    model: &Model,
    split: &TokenSplit,
    b: usize,
    t: usize,
    batches: usize,
    ws: &mut Workspace,
    run: Option<DsaRun>,
) -> Option<EvalOut> {
    let starts = data::eval_windows(split, t, batches * b);
    if starts.is_empty() {
        return None;
    }
    let toks = split.tokens();
    let (mut sum, mut count) = (0.0f64, 0usize);
    let (mut kl, mut recall, mut nb) = (0.0f64, 0.0f64, 0usize);
    let mut moe_loads: Vec<Option<Vec<u64>>> = Vec::new();
    for chunk in starts.chunks(b) {
        let mut x = Vec::with_capacity(chunk.len() * t);
        let mut y = Vec::with_capacity(chunk.len() * t);
        for &s in chunk {
            x.extend_from_slice(&toks[s..s + t]);
            y.extend_from_slice(&toks[s + 1..s + t + 1]);
        }
        match run {
            Some(r) => {
                model.forward_dsa(&x, chunk.len(), t, ws, r);
                kl += ws.dsa_stats.kl;
                recall += ws.dsa_stats.recall.unwrap_or(0.0);
                nb += 1;
            }
            None => model.forward(&x, chunk.len(), t, ws),
        }
        add_moe_loads(&mut moe_loads, ws);
        sum += model.loss(&y, ws) * y.len() as f64;
        count += y.len();
    }
    let loss = sum / count as f64;
    let bpb = loss / std::f64::consts::LN_2 * split.n_tokens as f64 / split.n_bytes.max(1) as f64;
    let stats = run.map(|r| DsaStats {
        kl: kl / nb as f64,
        recall: r.recall.then_some(recall / nb as f64),
    });
    Some(EvalOut {
        loss,
        bpb,
        dsa: stats,
        moe_loads,
    })
}

/// Entropy (nats/token) of the unigram distribution of `tokens`: the loss of a model that
/// ignores context, the bar a trained model must get well below.
pub fn unigram_entropy(tokens: &[u32], vocab: usize) -> f64 {
    let mut counts = vec![0u64; vocab.max(1)];
    for &t in tokens {
        if (t as usize) < counts.len() {
            counts[t as usize] += 1;
        }
    }
    let n = tokens.len().max(1) as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.ln()
        })
        .sum()
}

fn append_metrics(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{v}").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Keep only the metric lines with `step <= keep` (used when resuming).
fn truncate_metrics(path: &Path, keep: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let s =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = String::new();
    for line in s.lines() {
        let step = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["step"].as_u64());
        if matches!(step, Some(st) if st <= keep) {
            out.push_str(line);
            out.push('\n');
        }
    }
    crate::util::write_atomic(path, out.as_bytes())
}

/// The run's tokenizer for a fresh run: the given file, or a byte-level BPE trained on the
/// training split.
fn fresh_tokenizer(
    path: Option<&Path>,
    run: &RunConfig,
    corpus: &data::Corpus,
) -> Result<Tokenizer> {
    if let Some(p) = path {
        return Tokenizer::load(p);
    }
    let vocab = run.model.vocab_size;
    eprintln!("training a byte-level BPE tokenizer (vocab {vocab}) on the training split…");
    let t0 = Instant::now();
    let docs = data::texts(corpus, data::Split::Train, run.train.tokenizer_max_bytes);
    let tok = Tokenizer::train(docs, vocab)?;
    eprintln!(
        "  done in {:.1}s ({} tokens)",
        t0.elapsed().as_secs_f64(),
        tok.vocab_size()
    );
    Ok(tok)
}

/// Everything the loop mutates, set up by [`start_fresh`] or [`start_resume`].
struct Session {
    run: RunConfig,
    model: Model,
    tok: Tokenizer,
    state: TrainState,
    adam_m: Vec<f32>,
    adam_v: Vec<f32>,
    /// Lazy Adam of each Engram table (empty without Engram).
    table_opt: Vec<SparseAdam>,
    /// Memory-only fine-tuning: the base run the delta is taken against.
    base: Option<DeltaBase>,
    /// The MoE refit pools, one per layer (empty unless `bias_fit_window > 0`).
    moe_pools: Vec<crate::moe::BiasPool>,
}

/// Copy the weights of `src` (an `--init` run) into `model`: the same tensors with the same
/// shapes are required (context length and RoPE scaling may differ; they have no weights).
/// One addition is allowed: a DSA model may start from a model without the lightning indexer
/// (DeepSeek-V3.2's recipe starts the indexer warm-up from a trained dense checkpoint); the
/// indexer tensors then keep their fresh initialisation.
fn init_weights(model: &mut Model, src: Model, from: &Path) -> Result<()> {
    let adds_indexer = src.cfg.dsa.is_none() && model.cfg.dsa.is_some();
    let new: Vec<_> = model
        .layout
        .tensors
        .iter()
        .filter(|t| !(adds_indexer && crate::model::is_indexer_tensor(&t.name)))
        .cloned()
        .collect();
    let (a, b) = (&new, &src.layout.tensors);
    for i in 0..a.len().max(b.len()) {
        match (a.get(i), b.get(i)) {
            (Some(x), Some(y)) if x.name == y.name && x.shape == y.shape => {}
            (x, y) => bail!(
                "--init {}: its weights do not fit the new model: tensor {} {:?} vs {} {:?} \
                 (only max_seq_len, rope_scaling, an added DSA indexer and training settings \
                 may change)",
                from.display(),
                y.map_or("(none)", |t| t.name.as_str()),
                y.map(|t| &t.shape),
                x.map_or("(none)", |t| t.name.as_str()),
                x.map(|t| &t.shape),
            ),
        }
    }
    for (x, y) in new.iter().zip(&src.layout.tensors) {
        model.params[x.range()].copy_from_slice(&src.params[y.range()]);
    }
    model.hash_tables = src.hash_tables;
    if src.engram.is_some() && src.cfg.engram == model.cfg.engram {
        model.engram = src.engram;
    }
    Ok(())
}

fn start_fresh(
    out: &Path,
    run: RunConfig,
    tokenizer: Option<&Path>,
    corpus: &data::Corpus,
    init: Option<&Path>,
) -> Result<Session> {
    if out.join(checkpoint::CHECKPOINT_DIR).exists() {
        bail!(
            "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    run.model.validate()?;
    run.train.validate(&run.model)?;
    let init = match init {
        Some(p) => Some((
            p,
            checkpoint::load(p, false).with_context(|| format!("--init {}", p.display()))?,
        )),
        None => None,
    };
    let tok = match (&init, tokenizer) {
        (Some((_, l)), None) => l.tokenizer.clone(),
        _ => fresh_tokenizer(tokenizer, &run, corpus)?,
    };
    if tok.vocab_size() > run.model.vocab_size {
        bail!(
            "the tokenizer has {} tokens but the model's vocab_size is {}: raise vocab_size or use a smaller tokenizer",
            tok.vocab_size(),
            run.model.vocab_size
        );
    }
    let mut model = Model::new(run.model.clone())?;
    model.init(run.train.seed);
    if model.engram.is_some() {
        let t0 = Instant::now();
        let compress = crate::engram::CompressedTokenizer::build(&tok)?;
        model.init_engram(compress, run.train.seed)?;
        model.engram_eot = Some(tok.eot());
        eprintln!(
            "engram: compression table built in {:.1}s\n{}",
            t0.elapsed().as_secs_f64(),
            model
                .engram
                .as_ref()
                .map(|e| e.inspect_text())
                .unwrap_or_default()
        );
    }
    if let Some((p, l)) = init {
        init_weights(&mut model, l.model, p)?;
        eprintln!(
            "initialised from {} (weights only; fresh optimizer state, step 0)",
            p.display()
        );
    }
    let table_opt = new_table_opt(&model);
    crate::util::write_atomic(
        &out.join("run.json"),
        serde_json::to_string_pretty(&run)?.as_bytes(),
    )?;
    tok.save(&out.join("tokenizer.json"))?;
    let metrics = out.join("metrics.jsonl");
    if metrics.exists() {
        std::fs::remove_file(&metrics)
            .with_context(|| format!("cannot remove stale {}", metrics.display()))?;
    }
    let n = model.layout.total;
    let moe_pools = model.new_moe_pools();
    Ok(Session {
        state: TrainState {
            format_version: 1,
            step: 0,
            tokens_seen: 0,
            data_rng: Rng::derived(run.train.seed, "data"),
            run: serde_json::to_value(&run)?,
        },
        run,
        model,
        tok,
        adam_m: vec![0.0; n],
        adam_v: vec![0.0; n],
        table_opt,
        base: None,
        moe_pools,
    })
}

/// A new run starting from the weights of the run `run.train.init` (see [`Start::Init`]).
/// Kept apart from [`start_fresh`] so that other ways of initialising from a run can share it.
fn start_init(out: &Path, mut run: RunConfig) -> Result<Session> {
    if out.join(checkpoint::CHECKPOINT_DIR).exists() {
        bail!(
            "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    let init = run
        .train
        .init
        .clone()
        .context("Start::Init needs train.init")?;
    let (base, l) = DeltaBase::open(&init)?;
    let mut model = l.model;
    crate::finetune::tables_to_ram(&mut model)?;
    run.model = model.cfg.clone();
    run.model.validate()?;
    run.train.validate(&run.model)?;
    let tok = l.tokenizer;
    eprintln!(
        "init: weights, tokenizer and Engram tables from {} (fingerprint {}); training {}",
        l.dir.display(),
        base.fingerprint,
        run.train.train_only.name()
    );
    crate::util::write_atomic(
        &out.join("run.json"),
        serde_json::to_string_pretty(&run)?.as_bytes(),
    )?;
    tok.save(&out.join("tokenizer.json"))?;
    for f in ["metrics.jsonl", "timing.jsonl"] {
        let p = out.join(f);
        if p.exists() {
            std::fs::remove_file(&p)
                .with_context(|| format!("cannot remove stale {}", p.display()))?;
        }
    }
    let n = model.layout.total;
    let table_opt = new_table_opt(&model);
    let moe_pools = model.new_moe_pools();
    Ok(Session {
        state: TrainState {
            format_version: 1,
            step: 0,
            tokens_seen: 0,
            data_rng: Rng::derived(run.train.seed, "data"),
            run: serde_json::to_value(&run)?,
        },
        base: (!run.train.train_only.is_all()).then_some(base),
        run,
        model,
        tok,
        adam_m: vec![0.0; n],
        adam_v: vec![0.0; n],
        table_opt,
        moe_pools,
    })
}

/// A fresh lazy Adam for each Engram table.
fn new_table_opt(model: &Model) -> Vec<SparseAdam> {
    model.engram.as_ref().map_or_else(Vec::new, |e| {
        e.layers
            .iter()
            .map(|l| SparseAdam::new(l.table.rows(), l.table.dim()))
            .collect()
    })
}

fn start_resume(
    out: &Path,
    max_steps: Option<u64>,
    dsa_stage: Option<DsaStage>,
) -> Result<Session> {
    let l = checkpoint::load(out, true)
        .with_context(|| format!("cannot resume from {}", out.display()))?;
    let mut state = l
        .state
        .with_context(|| format!("{}: state.json is missing", l.dir.display()))?;
    let mut run: RunConfig = serde_json::from_value(state.run.clone()).with_context(|| {
        format!(
            "{}: state.json holds an unreadable run config",
            l.dir.display()
        )
    })?;
    if let Some(n) = max_steps {
        if n < state.step {
            bail!("--steps {n} is below the run's current step {}", state.step);
        }
        run.train.max_steps = n;
        let beyond: Vec<u64> = run
            .train
            .keep_steps
            .iter()
            .copied()
            .filter(|&s| s > n)
            .collect();
        if !beyond.is_empty() {
            eprintln!("--steps {n}: the checkpoints of steps {beyond:?} (train.keep_steps) will not be kept");
        }
        state.run = serde_json::to_value(&run)?;
    }
    if let Some(st) = dsa_stage {
        if run.model.dsa.is_none() && !st.is_sparse() {
            bail!(
                "--dsa-stage {}: the run's model has no DSA config",
                st.name()
            );
        }
        if st != run.train.dsa_stage {
            eprintln!(
                "DSA stage: {} -> {} from step {}",
                run.train.dsa_stage.name(),
                st.name(),
                state.step
            );
        }
        run.train.dsa_stage = st;
        state.run = serde_json::to_value(&run)?;
    }
    truncate_metrics(&out.join("metrics.jsonl"), state.step)?;
    truncate_metrics(&out.join("timing.jsonl"), state.step)?;
    eprintln!(
        "resuming {} from step {} (of {})",
        out.display(),
        state.step,
        run.train.max_steps
    );
    let (adam_m, adam_v) = l.adam.context("optimizer state missing")?;
    let table_opt = match l.engram_opt {
        Some(o) => o,
        None if l.model.engram.is_some() => bail!(
            "{}: the Engram optimizer state (engram_optimizer.safetensors) is missing",
            l.dir.display()
        ),
        None => Vec::new(),
    };
    let base = match (&run.train.init, run.train.train_only.is_all()) {
        (Some(init), false) => Some(DeltaBase::open(init)?.0),
        _ => None,
    };
    let moe_pools = match l.moe_pools {
        Some(p) => p,
        None => l.model.new_moe_pools(),
    };
    Ok(Session {
        run,
        model: l.model,
        tok: l.tokenizer,
        state,
        adam_m,
        adam_v,
        table_opt,
        base,
        moe_pools,
    })
}

/// Train (or resume) a run. `stop` is polled after every step: when set, the run saves a
/// checkpoint and returns.
pub fn train(opts: TrainOptions, stop: &AtomicBool) -> Result<TrainSummary> {
    let out = &opts.out;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create run directory {}", out.display()))?;
    let metrics_path = out.join("metrics.jsonl");
    let (sess, corpus) = match opts.start {
        Start::Fresh {
            run,
            tokenizer,
            init,
        } => {
            let corpus = data::scan(&run.data)?;
            (
                start_fresh(out, *run, tokenizer.as_deref(), &corpus, init.as_deref())?,
                corpus,
            )
        }
        Start::Resume {
            max_steps,
            dsa_stage,
        } => {
            let sess = start_resume(out, max_steps, dsa_stage)?;
            let corpus = data::scan(&sess.run.data)?;
            (sess, corpus)
        }
        Start::Init { run } => {
            let corpus = data::scan(&run.data)?;
            (start_init(out, *run)?, corpus)
        }
    };
    let Session {
        run,
        mut model,
        tok,
        mut state,
        mut adam_m,
        mut adam_v,
        mut table_opt,
        base,
        mut moe_pools,
    } = sess;
    let mode = run.train.train_only;
    let tc = run.train.clone();
    // A crash between saving a kept step's checkpoint and keeping it: the run resumes from
    // that very checkpoint, so keep it now.
    if state.step > 0
        && tc.keep_steps.contains(&state.step)
        && !out.join(format!("checkpoint-step{}", state.step)).is_dir()
    {
        checkpoint::keep(out, state.step)?;
    }
    let cache = data::prepare(&corpus, &run.data, &tok, &opts.cache_root, opts.progress)?;
    eprintln!(
        "data: {} files, train {} tokens ({} bytes), val {} tokens; token cache {}{}",
        corpus.files.len(),
        human_count(cache.train.n_tokens as f64),
        human_count(cache.train.n_bytes as f64),
        human_count(cache.val.n_tokens as f64),
        cache.dir.display(),
        if cache.reused { " (reused)" } else { "" }
    );
    // Every id the model will see must lie in the Engram compression table (a token cache
    // written with another tokenizer would otherwise index out of it).
    model
        .check_engram_tokens(cache.train.tokens())
        .and_then(|_| model.check_engram_tokens(cache.val.tokens()))
        .with_context(|| format!("token cache {}", cache.dir.display()))?;
    let (b, t) = (tc.batch_size, tc.seq_len);
    if cache.train.n_tokens < t + 1 {
        bail!(
            "the training split has only {} tokens, fewer than seq_len + 1 = {}: use more data or a smaller --seq-len",
            cache.train.n_tokens,
            t + 1
        );
    }
    let h = model.counts();
    let unigram = unigram_entropy(cache.train.tokens(), run.model.vocab_size);
    eprintln!(
        "model: {} parameters, {} activated per token; {:.1} GFLOP per step",
        human_count(h.total as f64),
        human_count(h.activated as f64),
        run.model.train_flops(b, t) * tc.grad_accum as f64 / 1e9
    );
    eprintln!(
        "  embedding {}, attention {}, dense FFN {}, router {}, shared experts {}, routed experts {}, norms {}, output {}",
        human_count(h.embedding as f64),
        human_count(h.attention as f64),
        human_count(h.dense_ffn as f64),
        human_count(h.router as f64),
        human_count(h.shared_experts as f64),
        human_count(h.routed_experts as f64),
        human_count(h.norms as f64),
        human_count(h.output as f64),
    );
    if h.engram_gates > 0 {
        eprintln!(
            "  engram gates {}, engram tables {} (outside the flat buffer; lazy Adam at {}x lr)",
            human_count(h.engram_gates as f64),
            human_count(h.engram_tables as f64),
            run.model.engram.as_ref().map_or(0.0, |e| e.table_lr_mult)
        );
    }
    eprintln!("unigram entropy of the training tokens: {unigram:.3} nats/token (the loss to beat)");
    let timing_path = out.join("timing.jsonl");

    let mut grads = vec![0.0f32; model.layout.total];
    let mut ws = Workspace::default();
    // The MoE balancing sample's forward passes (`bias_fit_sample`), apart from the step's;
    // only for a model with routed (not hash) MoE layers and when the bias is balanced.
    let mut sample_ws = Workspace::headless();
    let sample_moe = run.model.bias_fit_sample > 0 && !model.routed_moe_layers().is_empty();
    if sample_moe {
        // A split shorter than one window fails here, before step 1.
        moe_sample_windows(&cache.train, tc.seed, 0, 0, run.model.bias_fit_sample_len)?;
    }
    // Memory-only fine-tuning: no weight gradients for the frozen backbone.
    ws.frozen_backbone = !mode.is_all();
    let mut eval_ws = Workspace::default();
    // The step's micro-batches, sampled before any of them runs so that each one's gradient
    // can be weighted by its share of the step's counted targets (see below).
    let mut xs = vec![vec![0u32; b * t]; tc.grad_accum];
    let mut ys = vec![vec![0u32; b * t]; tc.grad_accum];
    let pb = progress_bar(opts.progress, state.step, tc.max_steps);
    let started = Instant::now();
    let start_step = state.step;
    let mut last = (0.0f64, None::<(f64, f64)>);
    let mut stopped_early = false;
    let plot_title = out
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into());
    while state.step < tc.max_steps {
        let step = state.step + 1;
        let lr = tc.lr_at(step);
        let step_t0 = Instant::now();
        grads.fill(0.0);
        let mut tgrads: Vec<SparseGrad> = vec![SparseGrad::default(); table_opt.len()];
        let mut loss = 0.0;
        let mut loads: Vec<Option<Vec<u64>>> = vec![None; run.model.n_layers];
        let log_step = step % tc.log_interval == 0 || step == 1 || step == tc.max_steps;
        let mut dsa_kl = 0.0f64;
        let mut dsa_recall = None::<f64>;
        for (x, y) in xs.iter_mut().zip(ys.iter_mut()) {
            data::sample_batch(&cache.train, &mut state.data_rng, b, t, x, y)?;
            if let Some(sm) = &tc.synthetic {
                crate::longctx::mix_into_batch(
                    sm.task,
                    sm.fraction,
                    sm.loss,
                    &tok,
                    &mut state.data_rng,
                    b,
                    t,
                    x,
                    y,
                )?;
            }
        }
        let weights = micro_batch_weights(&ys);
        for (micro, (x, y)) in xs.iter().zip(&ys).enumerate() {
            let (x, y) = (&x[..], &y[..]);
            let w = weights[micro];
            let gs = w as f32;
            loss += w * match run.model.dsa {
                Some(_) => {
                    // Recall needs the dense attention in the sparse stage: measured on the
                    // first micro-batch of logging steps only.
                    let r = DsaRun {
                        stage: tc.dsa_stage,
                        kl: true,
                        recall: log_step && micro == 0,
                    };
                    let l = model.forward_backward_dsa(x, y, b, t, &mut grads, gs, &mut ws, r);
                    dsa_kl += ws.dsa_stats.kl / tc.grad_accum as f64;
                    if let Some(rc) = ws.dsa_stats.recall {
                        dsa_recall = Some(rc);
                    }
                    l
                }
                // (DSA models have no Engram tables, the only fallible part of a step.)
                None => model
                    .try_forward_backward(x, y, b, t, &mut grads, gs, &mut ws)
                    .with_context(|| format!("training step {step}"))?,
            };
            for (acc, g) in tgrads.iter_mut().zip(&ws.engram_table_grads) {
                acc.accumulate(g);
            }
            add_moe_loads(&mut loads, &ws);
            if run.model.bias_fit_window > 0 && run.model.bias_fit_sample == 0 && mode.is_all() {
                model.push_moe_pools(&mut moe_pools, &ws);
            }
        }
        // A non-finite loss or gradient stops the run before the optimizer step, so neither the
        // parameters nor the last checkpoint on disk are touched.
        if !loss.is_finite() {
            bail!(
                "loss became {loss} at step {step}{}: stopping; the last good checkpoint ({}) is intact. Lower --lr or check the data",
                where_nonfinite(&ws),
                last_saved(out)
            );
        }
        // The global norm covers the flat parameters and the Engram tables' sparse gradients.
        let table_sq: f64 = tgrads.iter().map(SparseGrad::sum_sq).sum();
        let gnorm = (trained_sum_sq(&model, &grads, mode) + table_sq).sqrt();
        if !gnorm.is_finite() {
            let layer = first_nonfinite_grad(&model, &grads).unwrap_or_default();
            bail!(
                "the gradient norm became {gnorm} at step {step} (first non-finite gradient: {layer}): stopping; the last good checkpoint ({}) is intact",
                last_saved(out)
            );
        }
        let layer_gnorms = layer_grad_norms(&model, &grads);
        if tc.grad_clip > 0.0 && gnorm > tc.grad_clip as f64 {
            let s = (tc.grad_clip as f64 / gnorm) as f32;
            grads.iter_mut().for_each(|g| *g *= s);
            tgrads.iter_mut().for_each(|g| g.scale(s));
        }
        let hp = AdamWParams {
            lr,
            beta1: tc.beta1,
            beta2: tc.beta2,
            eps: tc.adam_eps,
            weight_decay: tc.weight_decay,
        };
        let dsa_warmup = run.model.dsa.is_some() && tc.dsa_stage == DsaStage::Warmup;
        if dsa_warmup {
            // Warm-up: everything but the indexer is frozen (no update, no weight decay).
            optimizer_step_where(
                &mut model,
                &grads,
                &mut adam_m,
                &mut adam_v,
                hp,
                step,
                |t| crate::model::is_indexer_tensor(&t.name),
            );
        } else {
            optimizer_step_only(&mut model, &grads, &mut adam_m, &mut adam_v, hp, step, mode);
        }
        if let Some(e) = model.engram.as_mut() {
            let th = e.cfg.table_optimizer();
            for ((layer, opt), g) in e.layers.iter_mut().zip(&mut table_opt).zip(&tgrads) {
                opt.update(&mut layer.table, g, lr, &th)?;
            }
        }
        // The MoE balancing bias is part of the backbone: frozen in memory-only fine-tuning
        // and in the DSA warm-up.
        if mode.is_all() && !dsa_warmup {
            if sample_moe {
                let (n, len) = (run.model.bias_fit_sample, run.model.bias_fit_sample_len);
                let x = moe_sample_windows(&cache.train, tc.seed, step, n, len)?;
                match run.model.dsa {
                    // The attention of the stage, as in training (dense before the sparse
                    // stage; the warm-up does not balance).
                    Some(_) => model.forward_dsa(
                        &x,
                        n,
                        len,
                        &mut sample_ws,
                        DsaRun {
                            stage: tc.dsa_stage,
                            kl: false,
                            recall: false,
                        },
                    ),
                    None => model
                        .try_forward(&x, n, len, &mut sample_ws)
                        .with_context(|| format!("MoE balancing sample of step {step}"))?,
                }
                model.push_moe_pools(&mut moe_pools, &sample_ws);
            }
            model.balance_moe(&loads, &ws, &moe_pools, step);
        }
        let step_ms = step_t0.elapsed().as_secs_f64() * 1e3;
        state.step = step;
        state.tokens_seen += (b * t * tc.grad_accum) as u64;
        last.0 = loss;
        if step % tc.log_interval == 0 || step == 1 || step == tc.max_steps {
            let mut m = serde_json::json!({"step": step, "tokens": state.tokens_seen, "lr": lr, "loss": loss, "grad_norm": gnorm});
            if let Some(stats) = moe_stats(&model, &loads) {
                m["moe"] = stats;
            }
            m["layer_grad_norm"] = serde_json::json!(layer_gnorms);
            if !tgrads.is_empty() {
                m["engram_table_grad_norm"] = serde_json::json!(table_sq.sqrt());
                m["engram_rows_touched"] =
                    serde_json::json!(tgrads.iter().map(|g| g.rows.len()).collect::<Vec<_>>());
            }
            if run.model.dsa.is_some() {
                m["dsa_stage"] = serde_json::json!(tc.dsa_stage.name());
                m["dsa_kl"] = serde_json::json!(dsa_kl);
                if let Some(r) = dsa_recall {
                    m["dsa_recall"] = serde_json::json!(r);
                }
            }
            if let Some(g) = ws.hc_amax() {
                let col = |i: usize| g.iter().map(|x| x[i]).collect::<Vec<f64>>();
                m["hc_amax_fwd"] = serde_json::json!(col(0));
                m["hc_amax_bwd"] = serde_json::json!(col(1));
                m["hc_amax_fwd_single"] = serde_json::json!(col(2));
                m["hc_amax_bwd_single"] = serde_json::json!(col(3));
            }
            append_metrics(&metrics_path, &m)?;
        }
        let stop_now = stop.load(Ordering::SeqCst);
        if step % tc.eval_interval == 0 || step == tc.max_steps {
            // DSA: evaluate with the attention of the stage (dense before the sparse stage),
            // with the indexer KL and recall on the validation windows.
            let eval_run = run.model.dsa.as_ref().map(|_| DsaRun {
                stage: if tc.dsa_stage.is_sparse() {
                    DsaStage::Sparse
                } else {
                    DsaStage::Warmup
                },
                kl: true,
                recall: true,
            });
            if let Some(ev) = evaluate_with(
                &model,
                &cache.val,
                b,
                t,
                tc.eval_batches,
                &mut eval_ws,
                eval_run,
            ) {
                let (vl, bpb) = (ev.loss, ev.bpb);
                last.1 = Some((vl, bpb));
                let mut m = serde_json::json!({"step": step, "val_loss": vl, "val_bpb": bpb});
                let mut extra = String::new();
                if let Some(stats) = moe_stats(&model, &ev.moe_loads) {
                    m["val_moe"] = stats;
                }
                if let Some(w) = worst_load(&model, &ev.moe_loads) {
                    extra = format!(", max expert load {w:.2}x mean over the validation windows");
                }
                if let Some(ds) = ev.dsa {
                    m["val_dsa_kl"] = serde_json::json!(ds.kl);
                    m["val_dsa_recall"] = serde_json::json!(ds.recall);
                    extra += &format!(
                        ", indexer KL {:.4} recall {:.3}",
                        ds.kl,
                        ds.recall.unwrap_or(f64::NAN)
                    );
                }
                append_metrics(&metrics_path, &m)?;
                let line = format!("step {step}: val loss {vl:.4} nats/token, {bpb:.4} bits/byte (train {loss:.4}){extra}");
                if pb.is_hidden() {
                    eprintln!("{line}")
                } else {
                    pb.println(line)
                }
            }
            if let Err(e) =
                crate::plot::loss_curve(&metrics_path, &out.join("loss.png"), &plot_title)
            {
                tracing::warn!("could not draw the loss curve: {e:#}");
            }
            if !run.model.residual.is_plain() {
                if let Err(e) = crate::plot::hc_stability(
                    &metrics_path,
                    &out.join("hc_amax.png"),
                    &out.join("grad_norm.png"),
                    &plot_title,
                ) {
                    tracing::warn!("could not draw the Amax gain chart: {e:#}");
                }
            }
        }
        let keep = tc.keep_steps.contains(&step);
        if step % tc.save_interval == 0 || step == tc.max_steps || stop_now || keep {
            checkpoint::save_with(
                out,
                &mut model,
                &tok,
                (&adam_m, &adam_v),
                &table_opt,
                &moe_pools,
                &state,
            )?;
            if keep {
                checkpoint::keep(out, step)?;
            }
            if let Some(base) = &base {
                let st = crate::finetune::write_delta(out, &model, base, mode, step)?;
                let line = format!(
                    "engram delta: {} of {} rows changed, {} bytes (full tables {} bytes)",
                    st.rows.iter().sum::<usize>(),
                    st.table_rows.iter().sum::<usize>(),
                    st.delta_bytes,
                    st.table_bytes
                );
                if pb.is_hidden() {
                    eprintln!("{line}")
                } else {
                    pb.println(line)
                }
            }
        }
        // Wall-clock step time (optimizer included, evaluation and saving excluded) goes to
        // `timing.jsonl`: `metrics.jsonl` holds only deterministic values.
        if step % tc.log_interval == 0 || step == 1 || step == tc.max_steps {
            append_metrics(
                &timing_path,
                &serde_json::json!({"step": step, "step_ms": step_ms}),
            )?;
        }
        let el = started.elapsed().as_secs_f64();
        let tps = (state.step - start_step) as f64 * (b * t * tc.grad_accum) as f64 / el.max(1e-9);
        pb.set_position(step);
        let mut moe_msg = worst_load(&model, &loads)
            .map(|x| format!(" | max expert load {x:.2}x mean"))
            .unwrap_or_default();
        if run.model.dsa.is_some() {
            moe_msg.push_str(&format!(" | {} idx KL {dsa_kl:.4}", tc.dsa_stage.name()));
            if let Some(r) = dsa_recall {
                moe_msg.push_str(&format!(" recall {r:.3}"));
            }
        }
        pb.set_message(format!(
            "loss {loss:.4} | lr {lr:.2e} | {} tok/s{moe_msg}",
            human_count(tps)
        ));
        if pb.is_hidden() && step % tc.log_interval == 0 {
            eprintln!(
                "step {step}/{}: loss {loss:.4}, lr {lr:.2e}, {} tok/s{moe_msg}",
                tc.max_steps,
                human_count(tps)
            );
        }
        if stop_now {
            stopped_early = true;
            pb.abandon_with_message(format!(
                "stopped at step {step}; checkpoint saved in {}",
                out.display()
            ));
            break;
        }
    }
    if !stopped_early {
        pb.finish();
    }
    let el = started.elapsed().as_secs_f64();
    Ok(TrainSummary {
        steps: state.step,
        final_loss: last.0,
        val_loss: last.1.map(|v| v.0),
        val_bpb: last.1.map(|v| v.1),
        unigram_entropy: unigram,
        stopped_early,
        tokens_per_s: (state.step - start_step) as f64 * (b * t * tc.grad_accum) as f64
            / el.max(1e-9),
    })
}

/// " in <where>" for the first non-finite activation of the last forward pass, if any.
fn where_nonfinite(ws: &Workspace) -> String {
    ws.first_nonfinite()
        .map(|w| format!(" (first non-finite value: {w})"))
        .unwrap_or_default()
}

/// The step of the checkpoint currently on disk, for error messages.
fn last_saved(out: &Path) -> String {
    match checkpoint::load(out, false).ok().and_then(|l| l.state) {
        Some(s) => format!(
            "step {} in {}",
            s.step,
            out.join(checkpoint::CHECKPOINT_DIR).display()
        ),
        None => "none saved yet".into(),
    }
}

/// The layer index of a parameter name (`layers.{l}.…`), or `None` for the embedding, the head
/// and the final norm.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// L2 norm of the gradient of each layer's parameters (before clipping).
pub fn layer_grad_norms(model: &Model, grads: &[f32]) -> Vec<f64> {
    let mut sq = vec![0.0f64; model.cfg.n_layers];
    for t in &model.layout.tensors {
        if let Some(l) = layer_of(&t.name) {
            sq[l] += det_sum_sq(&grads[t.range()]);
        }
    }
    sq.into_iter().map(f64::sqrt).collect()
}

/// The first tensor (in layout order) whose gradient holds a NaN or infinity.
fn first_nonfinite_grad(model: &Model, grads: &[f32]) -> Option<String> {
    model
        .layout
        .tensors
        .iter()
        .find(|t| grads[t.range()].iter().any(|g| !g.is_finite()))
        .map(|t| t.name.clone())
}

/// Sum of squares of the gradients of the tensors `mode` trains.
fn trained_sum_sq(model: &Model, grads: &[f32], mode: TrainOnly) -> f64 {
    if mode.is_all() {
        return det_sum_sq(grads);
    }
    model
        .layout
        .tensors
        .iter()
        .filter(|t| t.trainable && mode.trains(&t.name))
        .map(|t| det_sum_sq(&grads[t.range()]))
        .sum()
}

/// [`optimizer_step`] restricted to the tensors `mode` trains: the others get no update and
/// no weight decay (they stay bit-identical).
pub fn optimizer_step_only(
    model: &mut Model,
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: AdamWParams,
    step: u64,
    mode: TrainOnly,
) {
    for spec in model
        .layout
        .tensors
        .iter()
        .filter(|t| t.trainable && mode.trains(&t.name))
    {
        let r = spec.range();
        adamw::step(
            &mut model.params[r.clone()],
            &grads[r.clone()],
            &mut m[r.clone()],
            &mut v[r],
            hp,
            step,
            spec.decay,
        );
    }
}

/// AdamW over every trainable tensor (weight decay where the tensor asks for it).
pub fn optimizer_step(
    model: &mut Model,
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: AdamWParams,
    step: u64,
) {
    optimizer_step_where(model, grads, m, v, hp, step, |_| true)
}

/// [`optimizer_step`] restricted to the trainable tensors for which `only` holds: the others
/// (parameters and moments) are not touched at all.
pub fn optimizer_step_where(
    model: &mut Model,
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: AdamWParams,
    step: u64,
    only: impl Fn(&crate::model::TensorSpec) -> bool,
) {
    for spec in model
        .layout
        .tensors
        .iter()
        .filter(|t| t.trainable && only(t))
    {
        let r = spec.range();
        adamw::step(
            &mut model.params[r.clone()],
            &grads[r.clone()],
            &mut m[r.clone()],
            &mut v[r],
            hp,
            step,
            spec.decay,
        );
    }
}

/// Add the expert loads of the last forward pass (per layer; `None` for dense layers) to `acc`,
/// growing it to the model's layer count on first use.
fn add_moe_loads(acc: &mut Vec<Option<Vec<u64>>>, ws: &Workspace) {
    let layer_loads = ws.moe_loads();
    if acc.len() < layer_loads.len() {
        acc.resize(layer_loads.len(), None);
    }
    for (a, l) in acc.iter_mut().zip(layer_loads) {
        if let Some(l) = l {
            let a = a.get_or_insert_with(|| vec![0; l.len()]);
            a.iter_mut().zip(l).for_each(|(a, b)| *a += b);
        }
    }
}

/// Per MoE layer: expert load (max and min share relative to the mean) and the range of the
/// balancing bias, as logged in `metrics.jsonl` (also printed by `mnemo eval`).
pub fn moe_stats(model: &Model, loads: &[Option<Vec<u64>>]) -> Option<serde_json::Value> {
    let rows: Vec<serde_json::Value> = loads
        .iter()
        .enumerate()
        .filter_map(|(l, load)| {
            let load = load.as_ref()?;
            let (mx, mn) = crate::moe::load_stats(load);
            let (bmin, bmax) = model.moe_bias_range(l).unwrap_or((0.0, 0.0));
            Some(serde_json::json!({"layer": l, "load_max": mx, "load_min": mn, "bias_min": bmin, "bias_max": bmax, "hash": model.cfg.is_hash(l), "load": load}))
        })
        .collect();
    (!rows.is_empty()).then_some(serde_json::Value::Array(rows))
}

/// The largest max-load ratio over the routed (non-hash) MoE layers.
fn worst_load(model: &Model, loads: &[Option<Vec<u64>>]) -> Option<f64> {
    loads
        .iter()
        .enumerate()
        .filter(|(l, _)| !model.cfg.is_hash(*l))
        .filter_map(|(_, x)| x.as_ref())
        .map(|l| crate::moe::load_stats(l).0)
        .reduce(f64::max)
}

fn progress_bar(enabled: bool, pos: u64, len: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !enabled || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps | {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb.set_position(pos);
    pb
}

/// Weights of a step's micro-batches (their targets) so that the step's loss is the mean over
/// all its counted targets (those other than [`cross_entropy::IGNORE`]): micro-batch m returns
/// the mean over its own c_m counted targets and weighs in with `c_m / Σc` (`1 / grad_accum`
/// when nothing is masked; 0 for a micro-batch with nothing counted). With masked targets the
/// MoE balance loss of a micro-batch is weighted the same way.
pub fn micro_batch_weights(targets: &[Vec<u32>]) -> Vec<f64> {
    let counts: Vec<usize> = targets.iter().map(|y| cross_entropy::counted(y)).collect();
    let total = counts.iter().sum::<usize>().max(1) as f64;
    counts.iter().map(|&c| c as f64 / total).collect()
}

/// Timing of synthetic training steps (random tokens), for the benchmark against PyTorch.
#[derive(Debug, Serialize)]
pub struct StepBench {
    pub implementation: &'static str,
    /// Which model of an interleaved comparison.
    pub label: String,
    pub threads: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub params: usize,
    /// Engram table values (outside `params`).
    pub engram_table_params: usize,
    /// A memory-only fine-tuning step (frozen backbone, tables only).
    pub frozen_backbone: bool,
    pub step_ms_median: f64,
    pub step_ms_all: Vec<f64>,
    /// CPU time (all threads) per step, median, from `/proc/self/stat` (10 ms resolution);
    /// less sensitive than wall-clock time to other processes on a shared machine.
    pub step_cpu_ms_median: Option<f64>,
    pub step_cpu_ms_all: Vec<f64>,
    /// The model's residual kind (`plain`, `hc`, `mhc`) and stream count.
    pub residual: crate::config::Residual,
    pub hc_mult: usize,
    pub gflop_per_step: f64,
    pub achieved_gflops: f64,
    /// Milliseconds per phase of one step: forward, backward, optimizer (median over steps).
    pub phase_ms: serde_json::Value,
}

/// Run `warmup + steps` full training steps (forward, backward, clip, AdamW) on random tokens.
pub fn bench_steps(
    cfg: &ModelConfig,
    b: usize,
    t: usize,
    steps: usize,
    warmup: usize,
    seed: u64,
) -> Result<StepBench> {
    let v = BenchVariant {
        label: "model".into(),
        cfg: cfg.clone(),
        frozen_backbone: false,
    };
    let mut r = bench_steps_interleaved(&[v], b, t, steps, warmup, seed)?;
    Ok(r.remove(0))
}

/// Forward throughput of an Engram model whose tables are far larger than the CPU caches, with
/// the tables in RAM vs memory-mapped from a file (spec: offload), measured interleaved.
#[derive(Debug, Serialize)]
pub struct OffloadBench {
    pub table_bytes: u64,
    pub table_rows: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub reps: usize,
    pub file: String,
    /// Wall time of each forward, ms.
    pub ram_ms_all: Vec<f64>,
    pub mapped_ms_all: Vec<f64>,
    /// CPU time (all threads, 10 ms resolution) of each forward, ms: less sensitive to other
    /// processes than wall time.
    pub ram_cpu_ms_all: Vec<f64>,
    pub mapped_cpu_ms_all: Vec<f64>,
    /// Wall time of the Engram lookup alone (compress, hash, gather: the part that differs),
    /// run just before each forward, ms.
    pub ram_gather_ms_all: Vec<f64>,
    pub mapped_gather_ms_all: Vec<f64>,
    /// `mapped / ram − 1` of the median forward CPU time, in percent.
    pub mapped_overhead_cpu_pct: f64,
    /// Median gather time as a share of the median forward wall time (RAM, mapped), percent.
    pub gather_share_pct: [f64; 2],
    pub ram_tokens_per_s_median: f64,
    pub mapped_tokens_per_s_median: f64,
    /// `mapped / ram − 1` of the median forward time, in percent.
    pub mapped_overhead_pct: f64,
    /// The same over the per-repetition ratios (each pair ran back to back), median.
    pub mapped_overhead_pct_paired_median: f64,
}

/// [`OffloadBench`]: scale `cfg`'s Engram tables (rows per order and head) to about
/// `table_bytes` in total, write them to a file in `dir` (deleted at the end), and time
/// `reps` forward passes of `b × t` fresh random tokens with the RAM tables and with the
/// mapped file, alternating (RAM, mapped, RAM, mapped, …: the same tokens for both of a pair).
/// The mapped file is in the page cache (just written): this is host memory through a file
/// mapping (minor page faults, 4 KiB pages), not disk.
pub fn bench_offload(
    cfg: &ModelConfig,
    table_bytes: u64,
    b: usize,
    t: usize,
    reps: usize,
    dir: &Path,
    seed: u64,
) -> Result<OffloadBench> {
    let mut cfg = cfg.clone();
    let e = cfg
        .engram
        .as_mut()
        .context("bench engram-offload needs a model with Engram (e.g. --preset tiny-engram)")?;
    let orders = e.max_ngram_size - 1;
    let per_head =
        table_bytes / (4 * e.head_dim * e.n_head_per_ngram * orders * e.layer_ids.len()) as u64;
    e.vocab_size_per_ngram = vec![per_head.max(16); orders];
    cfg.validate()?;
    let mut model = Model::new(cfg.clone())?;
    model.init(seed);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let eng = model.engram.as_mut().context("engram")?;
    let mut mapped = Vec::new();
    let mut files = Vec::new();
    for (i, l) in eng.layers.iter().enumerate() {
        let p = dir.join(format!("offload-bench-{}-{i}.f32", std::process::id()));
        l.table.write_file(&p)?;
        mapped.push(crate::engram::EngramTable::open_mapped(
            &p,
            l.table.rows(),
            l.table.dim(),
            false,
        )?);
        files.push(p);
    }
    let rows: usize = eng.layers.iter().map(|l| l.table.rows()).sum();
    let bytes: u64 = eng.layers.iter().map(|l| l.table.bytes()).sum();
    let vocab = eng.compress.tokenizer_vocab_size().min(cfg.vocab_size);
    type Times = [Vec<f64>; 6];
    let result = (|| -> Result<Times> {
        let mut rng = Rng::new(seed);
        let mut ws = Workspace::default();
        let mut tm: Times = Default::default();
        let swap = |model: &mut Model, other: &mut Vec<crate::engram::EngramTable>| {
            if let Some(e) = model.engram.as_mut() {
                for (l, o) in e.layers.iter_mut().zip(other.iter_mut()) {
                    std::mem::swap(&mut l.table, o);
                }
            }
        };
        // One untimed pass each (workspace allocation).
        let x: Vec<u32> = (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect();
        for rep in 0..=reps {
            let x = if rep == 0 {
                x.clone()
            } else {
                (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect()
            };
            // Other tokens for the lookup timed alone, so that the forward's rows stay cold.
            let xg: Vec<u32> = (0..b * t).map(|_| rng.below(vocab as u64) as u32).collect();
            for is_mapped in [false, true] {
                if is_mapped {
                    swap(&mut model, &mut mapped);
                }
                let g0 = Instant::now();
                let lookup = model.engram.as_ref().map(|e| {
                    let pos = crate::engram::positions_in_documents(&xg, b, t, None);
                    e.lookup_all(&e.compress.compress(&xg), &pos)
                });
                let gather_ms = g0.elapsed().as_secs_f64() * 1e3;
                let c0 = crate::util::process_cpu_seconds();
                let t0 = Instant::now();
                let r = model.try_forward(&x, b, t, &mut ws);
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                let cpu = c0
                    .zip(crate::util::process_cpu_seconds())
                    .map_or(f64::NAN, |(a, b)| (b - a) * 1e3);
                if is_mapped {
                    swap(&mut model, &mut mapped);
                }
                r?;
                lookup.transpose()?;
                if rep > 0 {
                    let k = usize::from(is_mapped);
                    tm[k].push(ms);
                    tm[2 + k].push(cpu);
                    tm[4 + k].push(gather_ms);
                }
            }
        }
        Ok(tm)
    })();
    drop(mapped);
    for p in &files {
        let _ = std::fs::remove_file(p);
    }
    let [ram_ms, map_ms, ram_cpu, map_cpu, ram_g, map_g] = result?;
    let med = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let paired: Vec<f64> = ram_ms
        .iter()
        .zip(&map_ms)
        .map(|(r, m)| m / r - 1.0)
        .collect();
    let (r, m) = (med(&ram_ms), med(&map_ms));
    let toks = (b * t) as f64;
    Ok(OffloadBench {
        table_bytes: bytes,
        table_rows: rows,
        batch: b,
        seq_len: t,
        reps,
        file: dir.display().to_string(),
        ram_tokens_per_s_median: toks / (r / 1e3),
        mapped_tokens_per_s_median: toks / (m / 1e3),
        mapped_overhead_pct: 100.0 * (m / r - 1.0),
        mapped_overhead_pct_paired_median: 100.0 * med(&paired),
        mapped_overhead_cpu_pct: 100.0 * (med(&map_cpu) / med(&ram_cpu) - 1.0),
        gather_share_pct: [100.0 * med(&ram_g) / r, 100.0 * med(&map_g) / m],
        ram_cpu_ms_all: ram_cpu,
        mapped_cpu_ms_all: map_cpu,
        ram_gather_ms_all: ram_g,
        mapped_gather_ms_all: map_g,
        ram_ms_all: ram_ms,
        mapped_ms_all: map_ms,
    })
}

/// The windows of the MoE balancing sample after optimizer step `step` (`bias_fit_sample`):
/// `n` windows of `len` tokens of `split` (`[n·len]`), drawn from a stream derived from the
/// run's seed and the step, so that nothing about it needs checkpointing.
pub fn moe_sample_windows(
    split: &TokenSplit,
    seed: u64,
    step: u64,
    n: usize,
    len: usize,
) -> Result<Vec<u32>> {
    let toks = split.tokens();
    if len == 0 || toks.len() < len {
        bail!(
            "the training split has {} tokens, fewer than bias_fit_sample_len = {len}: lower it or use more data",
            toks.len()
        );
    }
    let mut rng = Rng::derived(
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        "moe-sample",
    );
    let starts = (toks.len() - len + 1) as u64;
    let mut x = Vec::with_capacity(n * len);
    for _ in 0..n {
        let s = rng.below(starts) as usize;
        x.extend_from_slice(&toks[s..s + len]);
    }
    Ok(x)
}

/// One model of [`bench_steps_interleaved`].
#[derive(Clone, Debug)]
pub struct BenchVariant {
    pub label: String,
    pub cfg: ModelConfig,
    /// Time the memory-only fine-tuning step (`--train-only engram`): frozen backbone (no
    /// weight gradients below/outside Engram, no AdamW step), tables only.
    pub frozen_backbone: bool,
}

/// Time training steps of several models in turn (step 1 of each, then step 2 of each, …), so
/// that load from other processes hits all of them alike. A step is what `mnemo train` does:
/// forward + backward, global-norm clip (flat gradients and the Engram tables' sparse ones),
/// AdamW on the flat parameters (skipped for a frozen backbone), the MoE bias update, and the
/// Engram tables' lazy Adam over the rows the batch touched.
pub fn bench_steps_interleaved(
    variants: &[BenchVariant],
    b: usize,
    t: usize,
    steps: usize,
    warmup: usize,
    seed: u64,
) -> Result<Vec<StepBench>> {
    struct Run {
        model: Model,
        x: Vec<u32>,
        y: Vec<u32>,
        grads: Vec<f32>,
        m: Vec<f32>,
        v: Vec<f32>,
        table_opt: Vec<SparseAdam>,
        ws: Workspace,
        pools: Vec<crate::moe::BiasPool>,
        sample_ws: Workspace,
        rng: Rng,
        vocab: usize,
        times: Vec<f64>,
        cpu: Vec<f64>,
        fwd_t: Vec<f64>,
        bwd_t: Vec<f64>,
        opt_t: Vec<f64>,
    }
    let mut runs = Vec::new();
    for var in variants {
        let cfg = &var.cfg;
        let mut model = Model::new(cfg.clone())?;
        model.init(seed);
        let mut rng = Rng::new(seed);
        let n = b * t;
        // Token ids inside the Engram compression table when there is one.
        let vocab = model
            .engram
            .as_ref()
            .map_or(cfg.vocab_size, |e| e.compress.tokenizer_vocab_size())
            .min(cfg.vocab_size);
        let x: Vec<u32> = (0..n).map(|_| rng.below(vocab as u64) as u32).collect();
        let y: Vec<u32> = (0..n).map(|_| rng.below(vocab as u64) as u32).collect();
        let grads = vec![0.0f32; model.layout.total];
        let ws = Workspace {
            frozen_backbone: var.frozen_backbone,
            ..Workspace::default()
        };
        runs.push(Run {
            table_opt: new_table_opt(&model),
            pools: model.new_moe_pools(),
            sample_ws: Workspace::headless(),
            rng,
            vocab,
            model,
            x,
            y,
            m: vec![0.0f32; grads.len()],
            v: vec![0.0f32; grads.len()],
            grads,
            ws,
            times: vec![],
            cpu: vec![],
            fwd_t: vec![],
            bwd_t: vec![],
            opt_t: vec![],
        });
    }
    for i in 0..warmup + steps {
        for (r, var) in runs.iter_mut().zip(variants) {
            let t0 = Instant::now();
            r.grads.fill(0.0);
            r.model.try_forward(&r.x, b, t, &mut r.ws)?;
            let t1 = Instant::now();
            let c1 = crate::util::process_cpu_seconds();
            // forward_backward repeats the forward; time it separately and subtract.
            r.model
                .try_forward_backward(&r.x, &r.y, b, t, &mut r.grads, 1.0, &mut r.ws)?;
            let t2 = Instant::now();
            let mut tgrads = r.ws.engram_table_grads.clone();
            let table_sq: f64 = tgrads.iter().map(SparseGrad::sum_sq).sum();
            let gn = (det_sum_sq(&r.grads) + table_sq).sqrt();
            if gn > 1.0 {
                let s = (1.0 / gn) as f32;
                r.grads.iter_mut().for_each(|g| *g *= s);
                tgrads.iter_mut().for_each(|g| g.scale(s));
            }
            let hp = AdamWParams {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
            };
            if !var.frozen_backbone {
                optimizer_step(&mut r.model, &r.grads, &mut r.m, &mut r.v, hp, i as u64 + 1);
                let loads: Vec<Option<Vec<u64>>> =
                    r.ws.moe_loads()
                        .into_iter()
                        .map(|l| l.map(<[u64]>::to_vec))
                        .collect();
                // The balancing as in training: the sign step and the refit, its pool filled
                // with this step's batch (the first step fills the whole window, so that every
                // timed step fits a full pool).
                let fill = if i == 0 {
                    r.model.cfg.bias_fit_window.max(1)
                } else {
                    1
                };
                let len = r.model.cfg.bias_fit_sample_len;
                let n = if r.model.routed_moe_layers().is_empty() {
                    0
                } else {
                    r.model.cfg.bias_fit_sample
                };
                for _ in 0..fill {
                    if n > 0 {
                        // The fresh sample of random tokens, as long as training's.
                        let xs: Vec<u32> = (0..n * len)
                            .map(|_| r.rng.below(r.vocab as u64) as u32)
                            .collect();
                        r.model.try_forward(&xs, n, len, &mut r.sample_ws)?;
                        r.model.push_moe_pools(&mut r.pools, &r.sample_ws);
                    } else {
                        r.model.push_moe_pools(&mut r.pools, &r.ws);
                    }
                }
                r.model.balance_moe(&loads, &r.ws, &r.pools, i as u64 + 1);
            }
            if let Some(e) = r.model.engram.as_mut() {
                let th = e.cfg.table_optimizer();
                for ((layer, opt), g) in e.layers.iter_mut().zip(&mut r.table_opt).zip(&tgrads) {
                    opt.update(&mut layer.table, g, hp.lr, &th)?;
                }
            }
            let t3 = Instant::now();
            if i >= warmup {
                let f = (t1 - t0).as_secs_f64() * 1e3;
                let fb = (t2 - t1).as_secs_f64() * 1e3;
                let o = (t3 - t2).as_secs_f64() * 1e3;
                r.fwd_t.push(f);
                r.bwd_t.push(fb - f);
                r.opt_t.push(o);
                r.times.push(fb + o);
                if let (Some(a), Some(b)) = (c1, crate::util::process_cpu_seconds()) {
                    r.cpu.push((b - a) * 1e3);
                }
            }
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut out = Vec::new();
    for (mut r, var) in runs.into_iter().zip(variants) {
        let cfg = &var.cfg;
        let all = r.times.clone();
        let step_ms = med(&mut r.times);
        let gflop = cfg.train_flops(b, t) / 1e9;
        out.push(StepBench {
            implementation: "mnemo",
            label: var.label.clone(),
            threads: rayon::current_num_threads(),
            batch: b,
            seq_len: t,
            params: r.model.layout.total,
            engram_table_params: r
                .model
                .engram
                .as_ref()
                .map_or(0, |e| e.layers.iter().map(|l| l.table.rows() * l.table.dim()).sum()),
            frozen_backbone: var.frozen_backbone,
            step_ms_median: step_ms,
            step_ms_all: all,
            step_cpu_ms_median: (!r.cpu.is_empty()).then(|| med(&mut r.cpu)),
            step_cpu_ms_all: r.cpu.clone(),
            residual: cfg.residual,
            hc_mult: cfg.hc_mult,
            gflop_per_step: gflop,
            achieved_gflops: gflop / (step_ms / 1e3),
            phase_ms: serde_json::json!({"forward": med(&mut r.fwd_t), "backward": med(&mut r.bwd_t), "optimizer": med(&mut r.opt_t)}),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cross_entropy::IGNORE;

    /// The MoE balancing sample: `n` windows of `len` consecutive tokens of the split, the same
    /// for the same seed and step (resume needs no state), another draw at another step or
    /// seed, and a clear error when the split is shorter than a window.
    #[test]
    fn moe_sample_windows_are_slices_drawn_per_step() {
        let toks: Vec<u32> = (0..500).collect();
        let split = TokenSplit::from_tokens(toks, 500, 1);
        let x = moe_sample_windows(&split, 7, 12, 9, 16).unwrap();
        assert_eq!(x.len(), 9 * 16);
        for w in x.chunks_exact(16) {
            // Consecutive ids: a slice of the split.
            assert!(w.windows(2).all(|p| p[1] == p[0] + 1), "{w:?}");
        }
        assert_eq!(x, moe_sample_windows(&split, 7, 12, 9, 16).unwrap());
        assert_ne!(x, moe_sample_windows(&split, 7, 13, 9, 16).unwrap());
        assert_ne!(x, moe_sample_windows(&split, 8, 12, 9, 16).unwrap());
        // A window as long as the split is the whole split.
        let all = moe_sample_windows(&split, 1, 1, 2, 500).unwrap();
        assert_eq!(&all[..500], split.tokens());
        let e = moe_sample_windows(&split, 1, 1, 2, 501).unwrap_err();
        assert!(
            format!("{e:#}").contains("bias_fit_sample_len = 501"),
            "{e:#}"
        );
    }

    /// Gradient accumulation over micro-batches with different numbers of masked targets equals
    /// one batch holding all their rows: the mean is over all counted targets of the step.
    #[test]
    fn accumulation_with_masked_targets_matches_one_batch() {
        let cfg = ModelConfig {
            vocab_size: 19,
            d_model: 12,
            n_layers: 1,
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 6,
            rope_dim: 4,
            ffn_hidden: 10,
            max_seq_len: 8,
            init_std: 0.3,
            ..ModelConfig::dense_defaults()
        };
        let mut m = Model::new(cfg).unwrap();
        m.init(2);
        let t = 6;
        let tokens: Vec<u32> = (0..2 * t).map(|i| (i * 7 % 19) as u32).collect();
        // Row 0 keeps one target, row 1 keeps five.
        let mut targets: Vec<u32> = (0..2 * t).map(|i| (i * 5 % 19) as u32).collect();
        for j in [0, 1, 2, 4, 5, 6] {
            targets[j] = IGNORE;
        }
        let mut ws = Workspace::default();
        let mut whole = vec![0.0; m.layout.total];
        let l_whole = m.forward_backward(&tokens, &targets, 2, t, &mut whole, 1.0, &mut ws);
        let ys = vec![targets[..t].to_vec(), targets[t..].to_vec()];
        let w = micro_batch_weights(&ys);
        assert_eq!(w, vec![1.0 / 6.0, 5.0 / 6.0]);
        let mut acc = vec![0.0; m.layout.total];
        let mut l_acc = 0.0;
        for (r, y) in ys.iter().enumerate() {
            let x = &tokens[r * t..(r + 1) * t];
            l_acc += w[r] * m.forward_backward(x, y, 1, t, &mut acc, w[r] as f32, &mut ws);
        }
        assert!((l_whole - l_acc).abs() < 1e-5, "{l_whole} vs {l_acc}");
        let scale = whole.iter().fold(0.0f32, |a, g| a.max(g.abs()));
        for (a, b) in whole.iter().zip(&acc) {
            assert!((a - b).abs() <= 1e-5 * scale.max(1.0), "{a} vs {b}");
        }
        // Nothing masked: every micro-batch weighs 1 / grad_accum.
        assert_eq!(
            micro_batch_weights(&[vec![1, 2], vec![3, 4]]),
            vec![0.5, 0.5]
        );
        assert_eq!(micro_batch_weights(&[vec![IGNORE; 3]]), vec![0.0]);
    }
}
