//! The training loop: AdamW with warm-up + cosine schedule, gradient clipping and
//! accumulation, periodic validation (loss and bits per byte), JSONL metrics with a loss-curve
//! PNG, atomic checkpoints, bit-identical resumption, and a clean stop on request (Ctrl-C).
//!
//! Determinism: every kernel reduces in a fixed order that does not depend on thread
//! scheduling, the data windows come from a seeded [`Rng`](crate::rng::Rng) saved in the
//! checkpoint, and `metrics.jsonl` holds only values that are functions of (config, seed,
//! step) — timings go to the progress bar, not the file. So a run resumed from step `s` writes
//! the same bytes for steps `> s` as an uninterrupted run.
//!
//! [`train`] runs start → (step → log → validate → save)* ; one concern per file (the settings
//! of a run, [`TrainConfig`] and [`RunConfig`], are `crate::config::train`):
//!
//! - `start`: a fresh, `--init` or resumed run, and its token cache.
//! - `step`: one optimizer step, and the optimizer and gradient-norm pieces it is made of.
//! - `validate`: validation loss / bits per byte ([`evaluate`]), expert load statistics.
//! - `log`: `metrics.jsonl`, `timing.jsonl`, charts, the start summary and the progress bar.
//! - `save`: checkpoints, kept checkpoints, the Engram delta.
//! - `bench`: step-time and Engram offload benchmarks ([`bench_steps`], [`bench_offload`]).

mod bench;
mod bench_gemm;
mod log;
mod save;
mod start;
mod step;
mod validate;

pub use crate::config::{RunConfig, TrainConfig};
pub use bench::{
    bench_offload, bench_steps, bench_steps_interleaved, BenchVariant, OffloadBench, StepBench,
};
pub use step::{
    layer_grad_norms, micro_batch_weights, moe_sample_windows, optimizer_step, optimizer_step_only,
    optimizer_step_where, tensor_sum_sq,
};
pub use validate::{evaluate, evaluate_with, moe_stats, unigram_entropy, EvalOut};

use crate::config::DsaStage;
use crate::model::Workspace;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Validation windows of `seq_len` tokens behind `val_loss` (`train.eval_batches` batches
    /// of `batch_size`, fewer when the split is short).
    pub val_windows: usize,
    /// `train.eval_batches`.
    pub val_batches: usize,
    pub seq_len: usize,
}

/// Train (or resume) a run. `stop` is polled after every step: when set, the run saves a
/// checkpoint and returns.
pub fn train(opts: TrainOptions, stop: &AtomicBool) -> Result<TrainSummary> {
    let out = &opts.out;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create run directory {}", out.display()))?;
    let metrics_path = out.join("metrics.jsonl");
    let timing_path = out.join("timing.jsonl");
    let (mut sess, corpus) = start::start(out, opts.start)?;
    let tc = sess.run.train.clone();
    // Every GEMM of this run (and of its validation) in the run's precision; a resumed run
    // has its own config, so it keeps the precision it started with.
    crate::kernels::precision::set_gemm_precision(tc.precision);
    let cache = start::prepare_data(&sess, &corpus, &opts.cache_root, opts.progress)?;
    let unigram = unigram_entropy(cache.train.tokens(), sess.run.model.vocab_size);
    log::print_model(&sess.run, &sess.model, unigram);

    let mut stepper = step::Stepper::new(&sess, &cache.train)?;
    let mut eval_ws = Workspace::default();
    let progress = log::Progress::new(opts.progress, sess.state.step, &tc);
    let pb = &progress.pb;
    let mut last = (0.0f64, None::<(f64, f64)>);
    let mut stopped_early = false;
    let plot_title = out
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into());
    while sess.state.step < tc.max_steps {
        let s = stepper.step(&mut sess, &cache.train, out)?;
        let step = s.step;
        last.0 = s.loss;
        if log::logs_at(&tc, step) {
            let m = log::step_metrics(&sess.run, &sess.model, &stepper.ws, &s);
            log::append_metrics(&metrics_path, &m)?;
        }
        let stop_now = stop.load(Ordering::SeqCst);
        if step % tc.eval_interval == 0 || step == tc.max_steps {
            let v = validate::validate(
                &sess.model,
                &sess.run,
                &cache.val,
                &mut eval_ws,
                step,
                s.loss,
                &metrics_path,
                pb,
            )?;
            if v.is_some() {
                last.1 = v;
            }
            log::plots(&sess.run, &metrics_path, out, &plot_title);
        }
        let keep = tc.keep_steps.contains(&step);
        if step % tc.save_interval == 0 || step == tc.max_steps || stop_now || keep {
            save::save(out, &mut sess, keep, pb)?;
        }
        // Wall-clock step time (optimizer included, evaluation and saving excluded) goes to
        // `timing.jsonl`: `metrics.jsonl` holds only deterministic values.
        if log::logs_at(&tc, step) {
            log::append_metrics(
                &timing_path,
                &serde_json::json!({"step": step, "step_ms": s.step_ms}),
            )?;
        }
        progress.update(&sess.run, &sess.model, &s);
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
    Ok(TrainSummary {
        steps: sess.state.step,
        final_loss: last.0,
        val_loss: last.1.map(|v| v.0),
        val_bpb: last.1.map(|v| v.1),
        unigram_entropy: unigram,
        stopped_early,
        tokens_per_s: progress.tokens_per_s(sess.state.step),
        val_windows: crate::data::eval_windows(
            &cache.val,
            tc.seq_len,
            tc.eval_batches * tc.batch_size,
        )
        .len(),
        val_batches: tc.eval_batches,
        seq_len: tc.seq_len,
    })
}
