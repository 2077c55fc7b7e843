//! `mnemo`: train, evaluate and sample DeepSeek-V4-family language models on CPU.
//!
//! This file holds the command line (clap definitions) and the dispatch; each command lives in
//! its own `*_cmd.rs` module (the HTTP server in `serve/`), and all work happens in the `mnemo`
//! library.

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};

mod args;
mod ask_cmd;
mod bench_cmd;
mod cache_cmd;
mod config_cmd;
mod engram_cmd;
mod eval_cmd;
mod export_cmd;
mod generate_cmd;
mod logits_cmd;
mod longctx_cmd;
mod lookup_cmd;
mod pack_cmd;
mod quantize_cmd;
mod serve;
mod speculate_cmd;
mod tokenizer_cmd;
mod train_cmd;
mod v4scale_cmd;

#[derive(Parser)]
#[command(
    name = "mnemo",
    version,
    about = "Train, evaluate and run DeepSeek-V4-family language models on CPU.",
    long_about = "Train, evaluate and run DeepSeek-V4-family language models on CPU.\n\n\
    Quick start: `mnemo train` trains the `tiny` preset on the source files of the current \
    directory; `mnemo generate runs/tiny --prompt 'fn main'` samples from it."
)]
struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model from scratch on a directory of text/code (or resume a run).
    Train(train_cmd::TrainArgs),
    /// Print validation loss and bits per byte of a trained run; or, with `humaneval` /
    /// `humaneval-rust`, run a code benchmark and print pass@k.
    Eval(eval_cmd::EvalArgs),
    /// Generate text from a trained run, streaming tokens to stdout.
    Generate(generate_cmd::GenerateArgs),
    /// DeepSeek-V4 at V4-Flash's layer shapes: write a random packed checkpoint, measure
    /// prefill, decode, KV cache and memory at long contexts.
    #[command(name = "v4-scale", subcommand)]
    V4Scale(v4scale_cmd::V4ScaleCmd),
    /// Export a run as a Hugging Face directory (DeepSeek-V4: transformers' `deepseek_v4`
    /// layout; dense models: the Llama layout).
    Export(export_cmd::ExportArgs),
    /// Write the logits of every position of a given token-id sequence to a safetensors file
    /// (full forward, or prefill + one-token decoding with --decode-from).
    #[command(long_about = logits_cmd::LONG_ABOUT)]
    Logits(logits_cmd::LogitsArgs),
    /// Write a float DeepSeek-V4 model as an official-layout checkpoint with FP8/FP4 weights
    /// (--type fp8+fp4: the release's mix; --type fp8).
    #[command(long_about = quantize_cmd::LONG_ABOUT)]
    Quantize(quantize_cmd::QuantizeArgs),
    /// Pack a repository into one context document (secrets excluded), count its tokens, fit
    /// it to a budget. Exit codes: 0 ok, 1 error, 2 usage, 3 partial (some files unreadable).
    Pack(pack_cmd::PackArgs),
    /// Ask a model about a repository: pack it, prefill it (reusing a saved prefix cache when
    /// the repository and model are unchanged), and stream the answer.
    Ask(ask_cmd::AskArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming), with
    /// `/health`, Prometheus `/metrics` and optional JSON request logs (`--log-requests`).
    Serve(serve::ServeArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(tokenizer_cmd::TokenizerCmd),
    /// Engram conditional-memory tools.
    #[command(subcommand)]
    Engram(engram_cmd::EngramCmd),
    /// Print the resolved run config (preset + config file + overrides) as JSON.
    Config(config_cmd::ConfigArgs),
    /// Benchmarks: a training step, or the GEMM peak.
    #[command(subcommand)]
    Bench(bench_cmd::BenchCmd),
    /// List or clear the caches: `mnemo ask`'s prefix caches and the tokenized corpora.
    #[command(subcommand)]
    Cache(cache_cmd::CacheCmd),
    /// Print a shell completion script, e.g. `mnemo completions bash >
    /// ~/.local/share/bash-completion/completions/mnemo`, `mnemo completions zsh >
    /// ~/.zfunc/_mnemo`, `mnemo completions fish > ~/.config/fish/completions/mnemo.fish`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() {
    let cli = Cli::parse();
    let mut filter =
        tracing_subscriber::EnvFilter::try_from_env("MNEMO_LOG").unwrap_or_else(|_| "warn".into());
    if matches!(&cli.cmd, Cmd::Serve(a) if a.log_requests) {
        if let Ok(d) = format!("{}=info", serve::REQUEST_LOG_TARGET).parse() {
            filter = filter.add_directive(d);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .event_format(LogFormat(tracing_subscriber::fmt::format()))
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot start the thread pool")?;
    }
    match cli.cmd {
        Cmd::Train(a) => train_cmd::run(a),
        Cmd::Eval(a) => eval_cmd::run(a),
        Cmd::Pack(a) => {
            let code = pack_cmd::run(a)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Cmd::Ask(a) => ask_cmd::run(a),
        Cmd::Generate(a) => generate_cmd::run(a),
        Cmd::V4Scale(c) => v4scale_cmd::run(c),
        Cmd::Logits(a) => logits_cmd::run(a),
        Cmd::Quantize(a) => quantize_cmd::run(a),
        Cmd::Export(a) => export_cmd::run(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Tokenizer(c) => tokenizer_cmd::run(c),
        Cmd::Engram(c) => engram_cmd::run(c),
        Cmd::Config(a) => config_cmd::run(&a),
        Cmd::Bench(c) => bench_cmd::run(c),
        Cmd::Cache(c) => cache_cmd::run(c),
        Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mnemo", &mut script);
            write_stdout(&script)
        }
    }
}

/// The log format: `tracing_subscriber`'s default, except that the request log lines of
/// `mnemo serve --log-requests` (target [`serve::REQUEST_LOG_TARGET`]) are written as their
/// message alone, one JSON object per line.
struct LogFormat<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for LogFormat<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut w: tracing_subscriber::fmt::format::Writer<'_>,
        ev: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        if ev.metadata().target() != serve::REQUEST_LOG_TARGET {
            return self.0.format_event(ctx, w, ev);
        }
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut m = Message(String::new());
        ev.record(&mut m);
        writeln!(w, "{}", m.0)
    }
}

/// Write `bytes` to stdout; a reader that stopped early (`mnemo … | head`) is not an error.
pub(crate) fn write_stdout(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    match o.write_all(bytes).and_then(|_| o.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}
