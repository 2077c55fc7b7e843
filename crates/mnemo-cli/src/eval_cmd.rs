//! `mnemo eval`: validation loss and bits per byte of a run (expert load of MoE layers,
//! `--no-engram` ablation); `mnemo eval humaneval` / `humaneval-rust`: code benchmarks
//! (pass@k); `mnemo eval --task niah|vt`: synthetic long context (in `longctx_cmd`).

use crate::longctx_cmd;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mnemo::config::CorpusSpec;
use mnemo::config::RunConfig;
use mnemo_eval::humaneval::{self, EvalOptions, ExecConfig, GenConfig, Lang};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    bench: Option<EvalBench>,
    /// Run directory (or checkpoint directory).
    #[arg(required_unless_present = "task")]
    run_dir: Option<PathBuf>,
    #[command(flatten)]
    longctx: crate::longctx_cmd::LongCtxArgs,
    /// Data to evaluate on [default: the run's training data directory]; its validation split is used.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Number of batches of validation windows (of the run's batch size and sequence length).
    /// Training's own validation (its progress line, metrics.jsonl and last line) uses
    /// train.eval_batches, 8 by default, so its numbers differ slightly from this one's.
    #[arg(long, default_value_t = 32)]
    batches: usize,
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Share of files held out for validation [default: the run's].
    #[arg(long, value_name = "F")]
    val_fraction: Option<f64>,
    /// Ablation: switch the Engram memory off (its contribution zeroed in every block).
    #[arg(long)]
    no_engram: bool,
}

/// `mnemo eval`: validation loss and bits per byte of a run (with the expert load of MoE
/// layers), or a code benchmark, or a synthetic long-context task.
pub fn run(a: EvalArgs) -> Result<()> {
    if let Some(b) = a.bench {
        return humaneval(b);
    }
    if a.longctx.task.is_some() {
        return longctx_cmd::run(a.longctx, a.run_dir.as_deref());
    }
    let run_dir = a.run_dir.context("give a run directory")?;
    let mut l = mnemo::checkpoint::load(&run_dir, false)?;
    if a.no_engram {
        let e =
            l.model.engram.as_mut().with_context(|| {
                format!("--no-engram: {} has no Engram memory", run_dir.display())
            })?;
        e.off = true;
    }
    l.model.check_engram_tables()?;
    let run: Option<RunConfig> = l
        .state
        .as_ref()
        .and_then(|s| serde_json::from_value(s.run.clone()).ok());
    let mut spec = match (&a.data, &run) {
        (Some(d), Some(r)) => CorpusSpec {
            root: d.clone(),
            ..r.data.clone()
        },
        (Some(d), None) => CorpusSpec::new(d),
        (None, Some(r)) => r.data.clone(),
        (None, None) => bail!(
            "{}: no training data recorded; pass --data DIR",
            run_dir.display()
        ),
    };
    if let Some(f) = a.val_fraction {
        if !(f > 0.0 && f < 1.0) {
            bail!("--val-fraction {f}: must be in (0, 1)");
        }
        spec.val_fraction = f;
    }
    if spec.val_fraction <= 0.0 {
        spec.val_fraction = 0.05;
    }
    let t = run
        .as_ref()
        .map(|r| r.train.seq_len)
        .unwrap_or(l.model.cfg.max_seq_len.min(256));
    let b = run.as_ref().map(|r| r.train.batch_size).unwrap_or(8);
    let corpus = mnemo::data::scan(&spec)?;
    let cache_root = a.cache_dir.unwrap_or_else(mnemo::data::default_cache_root);
    let cache = mnemo::data::prepare(&corpus, &spec, &l.tokenizer, &cache_root, true)?;
    l.model
        .check_engram_tokens(cache.val.tokens())
        .with_context(|| format!("token cache {}", cache.dir.display()))?;
    let mut ws = mnemo::model::Workspace::default();
    let ev = mnemo::train::evaluate_with(&l.model, &cache.val, b, t, a.batches, &mut ws, None)
        .with_context(|| {
            format!(
                "the validation split of {} is shorter than one window of {t} tokens",
                spec.root.display()
            )
        })?;
    let (loss, bpb) = (ev.loss, ev.bpb);
    // MoE: expert load over the validation windows (max / min share relative to the mean).
    let moe = match mnemo::train::moe_stats(&l.model, &ev.moe_loads) {
        Some(serde_json::Value::Array(rows)) => rows,
        _ => Vec::new(),
    };
    let windows = (a.batches * b).min(cache.val.n_tokens / t.max(1)).max(1);
    if let Some(p) = &a.longctx.json {
        let mut j = serde_json::json!({"run": run_dir, "data": spec.root, "val_loss": loss, "val_bpb": bpb, "val_tokens": cache.val.n_tokens, "windows": windows, "seq_len": t, "engram_off": a.no_engram});
        if !moe.is_empty() {
            j["moe"] = serde_json::Value::Array(moe);
        }
        if p.as_os_str() == "-" {
            println!("{j}");
        } else {
            std::fs::write(p, j.to_string())
                .with_context(|| format!("cannot write {}", p.display()))?;
        }
    } else {
        println!(
            "val loss {loss:.4} nats/token, {bpb:.4} bits/byte ({} val tokens, {windows} windows of {t} = {} batches of {b}; training's last line uses train.eval_batches){}",
            cache.val.n_tokens,
            a.batches,
            if a.no_engram { " [Engram off]" } else { "" }
        );
        for m in &moe {
            println!(
                "  layer {}{}: expert load max {:.2}x / min {:.2}x the mean",
                m["layer"],
                if m["hash"] == true { " (hash)" } else { "" },
                m["load_max"].as_f64().unwrap_or(0.0),
                m["load_min"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum EvalBench {
    /// HumanEval (164 Python problems): generate completions, run each problem's tests in a
    /// sandbox (timeout, resource limits, no network, temporary directory), print pass@k as JSON.
    Humaneval(HumanEvalArgs),
    /// HumanEval-Rust (180 Rust problems): like `humaneval`, compiling each program and its
    /// `#[cfg(test)]` tests with `rustc --test` and running the test binary.
    #[command(name = "humaneval-rust")]
    HumanevalRust(HumanEvalArgs),
}

#[derive(Args)]
pub struct HumanEvalArgs {
    /// Run directory, checkpoint directory, Hugging Face directory or `.gguf` model file.
    model: PathBuf,
    /// Problems (`.jsonl` or `.jsonl.gz`) [default: data/humaneval/HumanEval.jsonl.gz or
    /// data/humaneval/HumanEval_rust.jsonl, from scripts/fetch-humaneval.sh].
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// The k of pass@k (comma-separated or repeated; each at most --samples).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    k: Vec<usize>,
    /// Completions per problem (n of the pass@k estimator).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Softmax temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true, value_parser = crate::args::temperature)]
    temperature: f32,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling: smallest set of tokens with this total probability.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Seed of sample j is seed + j.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tokens to generate at most per completion.
    #[arg(long, default_value_t = 384)]
    max_tokens: usize,
    /// Evaluate only the first N problems.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Wrap each prompt in the model's chat template (an instruction to complete the function)
    /// and take the answer's code block, instead of continuing the raw prompt.
    #[arg(long)]
    chat: bool,
    /// Seconds a program (or a compiled test binary) may run.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Seconds rustc may take to compile one program.
    #[arg(long, default_value_t = 60.0)]
    compile_timeout: f64,
    /// Write per-problem results (completions, statuses, errors) here as JSON lines.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// No progress on stderr.
    #[arg(long)]
    quiet: bool,
    /// Also evaluate problems whose tests cannot run (32 of HumanEval-Rust 3.0.0 have a
    /// truncated test module without any `#[test]`); they are skipped by default.
    #[arg(long)]
    include_broken: bool,
}

/// `mnemo eval humaneval` / `humaneval-rust`: pass@k as JSON on stdout.
fn humaneval(bench: EvalBench) -> Result<()> {
    let (lang, a) = match bench {
        EvalBench::Humaneval(a) => (Lang::Python, a),
        EvalBench::HumanevalRust(a) => (Lang::Rust, a),
    };
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!("--temperature must be >= 0");
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    for (name, t) in [
        ("--timeout", a.timeout),
        ("--compile-timeout", a.compile_timeout),
    ] {
        if !(t.is_finite() && t > 0.0) {
            bail!("{name} must be a positive number of seconds");
        }
    }
    if a.samples > 1 && a.temperature == 0.0 {
        eprintln!(
            "warning: --samples {} with greedy decoding (--temperature 0) repeats one completion",
            a.samples
        );
    }
    let data = a.data.clone().unwrap_or_else(|| lang.default_data());
    let problems = humaneval::load_problems(&data)?;
    let exec = ExecConfig::detect(
        lang,
        Duration::from_secs_f64(a.timeout),
        Duration::from_secs_f64(a.compile_timeout),
    )?;
    let l = mnemo::checkpoint::load(&a.model, false)?;
    if !a.quiet {
        eprintln!(
            "{}: {} problems from {}{}",
            lang.benchmark(),
            problems.len(),
            data.display(),
            a.limit
                .map(|n| format!(", evaluating the first {n}"))
                .unwrap_or_default()
        );
        eprintln!("{}", humaneval::sandbox_summary());
    }
    let opts = EvalOptions {
        lang,
        samples: a.samples,
        ks: a.k.clone(),
        gen: GenConfig {
            max_tokens: a.max_tokens,
            sampling: mnemo::generate::Sampling {
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
            },
            chat: a.chat,
        },
        seed: a.seed,
        limit: a.limit,
        exec,
        out: a.out.clone(),
        progress: !a.quiet,
        include_broken: a.include_broken,
    };
    let mut summary = humaneval::evaluate(
        &l.model,
        &l.tokenizer,
        &a.model.display().to_string(),
        &problems,
        &opts,
    )?;
    summary["data"] = serde_json::json!(data.display().to_string());
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
