//! `mnemo eval humaneval` / `mnemo eval humaneval-rust`: code benchmarks (pass@k).

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use mnemo_eval::humaneval::{self, EvalOptions, ExecConfig, GenConfig, Lang};
use std::path::PathBuf;
use std::time::Duration;

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
    #[arg(long, default_value_t = 0.0)]
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

pub fn run(bench: EvalBench) -> Result<()> {
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
