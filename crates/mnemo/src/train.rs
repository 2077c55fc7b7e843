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
use crate::engram::{SparseAdam, SparseGrad};
use crate::finetune::{DeltaBase, TrainOnly};
use crate::kernels::adamw::{self, AdamWParams};
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
            seed: 1337,
            tokenizer_max_bytes: 32 << 20,
            train_only: TrainOnly::All,
            init: None,
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
        if self.log_interval == 0 || self.eval_interval == 0 || self.save_interval == 0 {
            return Err(bad(
                "log_interval/eval_interval/save_interval",
                "must be > 0".into(),
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
    },
    /// Continue from `out/checkpoint` with the run's own config; `max_steps` may change the
    /// step budget (and with it the cosine schedule from here on).
    Resume { max_steps: Option<u64> },
    /// A new run whose model (weights, tokenizer, Engram tables) is loaded from the run
    /// `run.train.init`, with fresh optimizer state; `run.model` is replaced by that run's model
    /// config. With `run.train.train_only` = `engram`/`engram+gates` only the memory is trained
    /// and `engram_delta.safetensors` is written beside each checkpoint.
    Init { run: Box<RunConfig> },
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
    let starts = data::eval_windows(split, t, batches * b);
    if starts.is_empty() {
        return None;
    }
    let toks = split.tokens();
    let (mut sum, mut count) = (0.0f64, 0usize);
    for chunk in starts.chunks(b) {
        let mut x = Vec::with_capacity(chunk.len() * t);
        let mut y = Vec::with_capacity(chunk.len() * t);
        for &s in chunk {
            x.extend_from_slice(&toks[s..s + t]);
            y.extend_from_slice(&toks[s + 1..s + t + 1]);
        }
        model.forward(&x, chunk.len(), t, ws);
        sum += model.loss(&y, ws) * y.len() as f64;
        count += y.len();
    }
    let loss = sum / count as f64;
    let bpb = loss / std::f64::consts::LN_2 * split.n_tokens as f64 / split.n_bytes.max(1) as f64;
    Some((loss, bpb))
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
}

fn start_fresh(
    out: &Path,
    run: RunConfig,
    tokenizer: Option<&Path>,
    corpus: &data::Corpus,
) -> Result<Session> {
    if out.join(checkpoint::CHECKPOINT_DIR).exists() {
        bail!(
            "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
            out.display()
        );
    }
    run.model.validate()?;
    run.train.validate(&run.model)?;
    let tok = fresh_tokenizer(tokenizer, &run, corpus)?;
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

fn start_resume(out: &Path, max_steps: Option<u64>) -> Result<Session> {
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
    Ok(Session {
        run,
        model: l.model,
        tok: l.tokenizer,
        state,
        adam_m,
        adam_v,
        table_opt,
        base,
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
        Start::Fresh { run, tokenizer } => {
            let corpus = data::scan(&run.data)?;
            (
                start_fresh(out, *run, tokenizer.as_deref(), &corpus)?,
                corpus,
            )
        }
        Start::Resume { max_steps } => {
            let sess = start_resume(out, max_steps)?;
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
    } = sess;
    let mode = run.train.train_only;
    let tc = run.train.clone();
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
    let mut eval_ws = Workspace::default();
    let mut x = vec![0u32; b * t];
    let mut y = vec![0u32; b * t];
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
        for _ in 0..tc.grad_accum {
            data::sample_batch(&cache.train, &mut state.data_rng, b, t, &mut x, &mut y)?;
            loss += model.forward_backward(
                &x,
                &y,
                b,
                t,
                &mut grads,
                1.0 / tc.grad_accum as f32,
                &mut ws,
            );
            for (acc, g) in tgrads.iter_mut().zip(&ws.engram_table_grads) {
                acc.accumulate(g);
            }
            for (acc, l) in loads.iter_mut().zip(ws.moe_loads()) {
                if let Some(l) = l {
                    let a = acc.get_or_insert_with(|| vec![0; l.len()]);
                    a.iter_mut().zip(l).for_each(|(a, b)| *a += b);
                }
            }
        }
        loss /= tc.grad_accum as f64;
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
        optimizer_step_only(&mut model, &grads, &mut adam_m, &mut adam_v, hp, step, mode);
        if let Some(e) = model.engram.as_mut() {
            let th = e.cfg.table_optimizer();
            for ((layer, opt), g) in e.layers.iter_mut().zip(&mut table_opt).zip(&tgrads) {
                opt.update(&mut layer.table, g, lr, &th)?;
            }
        }
        // The MoE balancing bias is part of the backbone: frozen in memory-only fine-tuning.
        if mode.is_all() {
            model.update_moe_bias(&loads);
            if run.model.bias_fit_iters > 0 {
                if run.model.bias_fit_rescore {
                    let sc = model.moe_rescore(&ws);
                    let sc: Vec<&[f32]> = sc.iter().map(|v| &v[..]).collect();
                    model.fit_moe_bias(&sc, run.model.bias_fit_iters);
                } else {
                    model.fit_moe_bias(&ws.moe_scores(), run.model.bias_fit_iters);
                }
            }
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
            if let Some((vl, bpb)) =
                evaluate(&model, &cache.val, b, t, tc.eval_batches, &mut eval_ws)
            {
                last.1 = Some((vl, bpb));
                append_metrics(
                    &metrics_path,
                    &serde_json::json!({"step": step, "val_loss": vl, "val_bpb": bpb}),
                )?;
                let line = format!("step {step}: val loss {vl:.4} nats/token, {bpb:.4} bits/byte (train {loss:.4})");
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
        if step % tc.save_interval == 0 || step == tc.max_steps || stop_now {
            checkpoint::save_with(
                out,
                &mut model,
                &tok,
                (&adam_m, &adam_v),
                &table_opt,
                &state,
            )?;
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
        let moe_msg = worst_load(&model, &loads)
            .map(|x| format!(" | max expert load {x:.2}x mean"))
            .unwrap_or_default();
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
    for spec in model.layout.tensors.iter().filter(|t| t.trainable) {
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

/// Per MoE layer: expert load (max and min share relative to the mean) of this step and the
/// range of the balancing bias.
fn moe_stats(model: &Model, loads: &[Option<Vec<u64>>]) -> Option<serde_json::Value> {
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

/// Timing of synthetic training steps (random tokens), for the benchmark against PyTorch.
#[derive(Debug, Serialize)]
pub struct StepBench {
    pub implementation: &'static str,
    pub threads: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub params: usize,
    pub step_ms_median: f64,
    pub step_ms_all: Vec<f64>,
    /// CPU time (all threads) per step, median, from `/proc/self/stat` (10 ms resolution);
    /// less sensitive than wall-clock time to other processes on a shared machine.
    pub step_cpu_ms_median: Option<f64>,
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
    let mut model = Model::new(cfg.clone())?;
    model.init(seed);
    let mut rng = Rng::new(seed);
    let n = b * t;
    let x: Vec<u32> = (0..n)
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let y: Vec<u32> = (0..n)
        .map(|_| rng.below(cfg.vocab_size as u64) as u32)
        .collect();
    let mut grads = vec![0.0f32; model.layout.total];
    let (mut m, mut v) = (vec![0.0f32; grads.len()], vec![0.0f32; grads.len()]);
    let mut ws = Workspace::default();
    let mut times = Vec::new();
    let mut cpu = Vec::new();
    let (mut fwd_t, mut bwd_t, mut opt_t) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        grads.fill(0.0);
        model.forward(&x, b, t, &mut ws);
        let t1 = Instant::now();
        let c1 = crate::util::process_cpu_seconds();
        // forward_backward repeats the forward; time it separately and subtract.
        model.forward_backward(&x, &y, b, t, &mut grads, 1.0, &mut ws);
        let t2 = Instant::now();
        let gn = det_sum_sq(&grads).sqrt();
        if gn > 1.0 {
            let s = (1.0 / gn) as f32;
            grads.iter_mut().for_each(|g| *g *= s);
        }
        let hp = AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        optimizer_step(&mut model, &grads, &mut m, &mut v, hp, i as u64 + 1);
        let loads: Vec<Option<Vec<u64>>> = ws
            .moe_loads()
            .into_iter()
            .map(|l| l.map(<[u64]>::to_vec))
            .collect();
        model.update_moe_bias(&loads);
        let t3 = Instant::now();
        if i >= warmup {
            let f = (t1 - t0).as_secs_f64() * 1e3;
            let fb = (t2 - t1).as_secs_f64() * 1e3;
            let o = (t3 - t2).as_secs_f64() * 1e3;
            fwd_t.push(f);
            bwd_t.push(fb - f);
            opt_t.push(o);
            times.push(fb + o);
            if let (Some(a), Some(b)) = (c1, crate::util::process_cpu_seconds()) {
                cpu.push((b - a) * 1e3);
            }
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let all = times.clone();
    let step_ms = med(&mut times);
    let gflop = cfg.train_flops(b, t) / 1e9;
    Ok(StepBench {
        implementation: "mnemo",
        threads: rayon::current_num_threads(),
        batch: b,
        seq_len: t,
        params: model.layout.total,
        step_ms_median: step_ms,
        step_ms_all: all,
        step_cpu_ms_median: (!cpu.is_empty()).then(|| med(&mut cpu)),
        residual: cfg.residual,
        hc_mult: cfg.hc_mult,
        gflop_per_step: gflop,
        achieved_gflops: gflop / (step_ms / 1e3),
        phase_ms: serde_json::json!({"forward": med(&mut fwd_t), "backward": med(&mut bwd_t), "optimizer": med(&mut opt_t)}),
    })
}
