//! `mnemo`: train, evaluate and sample DeepSeek-V4-family language models on CPU.
//!
//! This binary only parses arguments and resolves configs; all work happens in the `mnemo`
//! library.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use mnemo::config::ModelConfig;
use mnemo::data::CorpusSpec;
use mnemo::train::{RunConfig, Start, TrainConfig, TrainOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod eval_cmd;
mod longctx_cmd;
mod lookup_cmd;
mod pack_cmd;
mod serve;

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
    Train(TrainArgs),
    /// Print validation loss and bits per byte of a trained run; or, with `humaneval` /
    /// `humaneval-rust`, run a code benchmark and print pass@k.
    Eval(EvalArgs),
    /// Generate text from a trained run, streaming tokens to stdout.
    Generate(GenerateArgs),
    /// Pack a repository into one context document (secrets excluded), count its tokens, fit
    /// it to a budget. Exit codes: 0 ok, 1 error, 2 usage, 3 partial (some files unreadable).
    Pack(pack_cmd::PackArgs),
    /// Ask a model about a repository: pack it, prefill it (reusing a saved prefix cache when
    /// the repository and model are unchanged), and stream the answer.
    Ask(AskArgs),
    /// Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming).
    Serve(serve::ServeArgs),
    /// Tokenizer tools.
    #[command(subcommand)]
    Tokenizer(TokenizerCmd),
    /// Engram conditional-memory tools.
    #[command(subcommand)]
    Engram(EngramCmd),
    /// Print the resolved run config (preset + config file + overrides) as JSON.
    Config(ConfigArgs),
    /// Benchmarks: a training step, or the GEMM peak.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// Model preset: tiny (~3.5M parameters, minutes on 2 cores) or small (~22M).
    #[arg(long)]
    preset: Option<String>,
    /// JSON config file: {"preset": ..., "model": {...}, "train": {...}, "data": {...}}; every
    /// field optional, overriding the preset.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override any config field: `--set d_model=512`, `--set train.lr=1e-3`,
    /// `--set rope_layout=half` (repeatable; bare names are looked up in model, train, data).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Directory of text/code files to train on [default: the current directory].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Only files matching these globs (repeatable) [default: common source extensions].
    #[arg(long, value_name = "GLOB")]
    include: Vec<String>,
    /// Skip files matching these globs (repeatable).
    #[arg(long, value_name = "GLOB")]
    exclude: Vec<String>,
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per sequence.
    #[arg(long)]
    seq_len: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f32>,
    /// Random seed (initialisation and data order).
    #[arg(long)]
    seed: Option<u64>,
    /// DSA models: training stage `dense` (dense attention, everything trains, the indexer
    /// beside it), `warmup` (dense attention, only the indexer trains) or `sparse` (top-k
    /// attention; default). Allowed with --resume to switch stage.
    #[arg(long, value_name = "STAGE")]
    dsa_stage: Option<mnemo::dsa::DsaStage>,
    /// Start from this run's weights (not its optimizer state) in a new run whose model, training
    /// and data settings default to that run's: e.g. a long-context stage with `--seq-len 1024
    /// --rope-scaling-factor 4`. Only the context length and RoPE scaling of the model may change.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "preset")]
    init: Option<PathBuf>,
    /// YaRN RoPE scaling by this factor over the original context (the model's current
    /// `max_seq_len`, or its existing scaling's original); sets `max_seq_len = original · F`.
    #[arg(long, value_name = "F")]
    rope_scaling_factor: Option<f64>,
    /// Replace training rows with synthetic long-context documents: niah, vt or mix.
    #[arg(long, value_name = "TASK")]
    synthetic: Option<String>,
    /// Share of the training rows that are synthetic (with --synthetic) [default: 1].
    #[arg(long, value_name = "P", requires = "synthetic")]
    synthetic_mix: Option<f64>,
    /// Which targets of a synthetic row count in the loss: all (every next token) or answers
    /// (only the answer tokens; the filler's targets are ignored) [default: all].
    #[arg(long, value_name = "WHICH", requires = "synthetic")]
    synthetic_loss: Option<String>,
}

/// The model/train/data settings of an `--init` run: its `run.json` (or, for a checkpoint or
/// imported model without one, its model config with default training settings).
fn init_base(init: &Path) -> Result<serde_json::Value> {
    let run_json = init.join("run.json");
    if run_json.is_file() {
        let s = std::fs::read_to_string(&run_json)
            .with_context(|| format!("--init: cannot read {}", run_json.display()))?;
        let run: RunConfig = serde_json::from_str(&s)
            .with_context(|| format!("--init: {} is not a valid run config", run_json.display()))?;
        return Ok(serde_json::to_value(run)?);
    }
    let l = mnemo::checkpoint::load(init, false)
        .with_context(|| format!("--init {}", init.display()))?;
    Ok(serde_json::json!({
        "model": l.model.cfg,
        "train": TrainConfig::default(),
        "data": CorpusSpec::new(PathBuf::from(".")),
    }))
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Run directory for checkpoints and metrics [default: runs/<preset>, or the first free runs/<preset>-N].
    #[arg(long, value_name = "RUN_DIR")]
    out: Option<PathBuf>,
    /// Continue the run in this directory from its last checkpoint (bit-identical to an
    /// uninterrupted run). `--steps` may raise the step budget.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// Use this tokenizer.json instead of training a byte-level BPE on the data.
    #[arg(long, value_name = "FILE", conflicts_with = "init")]
    tokenizer: Option<PathBuf>,
    /// With --init: train only the Engram tables (`engram`) or the tables and their gates
    /// (`engram+gates`), backbone frozen; writes RUN_DIR/engram_delta.safetensors (the
    /// changed rows only), which loads on its own as base + delta.
    #[arg(long, value_name = "WHAT", requires = "init")]
    train_only: Option<String>,
    /// Where tokenized corpora are cached [default: $MNEMO_CACHE or ~/.cache/mnemo].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct EvalArgs {
    #[command(subcommand)]
    bench: Option<eval_cmd::EvalBench>,
    /// Run directory (or checkpoint directory).
    #[arg(required_unless_present = "task")]
    run_dir: Option<PathBuf>,
    #[command(flatten)]
    longctx: longctx_cmd::LongCtxArgs,
    /// Data to evaluate on [default: the run's training data directory]; its validation split is used.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Number of batches of validation windows.
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

#[derive(Args)]
struct GenerateArgs {
    /// Run directory, checkpoint directory, or a Llama-architecture `.gguf` model file.
    run_dir: PathBuf,
    /// Text to continue (or, with --chat, the user's message).
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (e.g. the one inside a GGUF) and answer it.
    #[arg(long)]
    chat: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
    /// Softmax temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Nucleus sampling: smallest set of tokens with this total probability.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Lookup-first decoding: draft tokens from N-gram matches in the prompt and output,
    /// verified in one forward pass (same output when greedy; same distribution otherwise).
    #[arg(long)]
    lookup: bool,
    /// Lossy lookup: emit continuations whose empirical N-gram probability is >= P without
    /// verification (implies --lookup).
    #[arg(long, value_name = "P")]
    lookup_threshold: Option<f32>,
}

#[derive(Args)]
struct AskArgs {
    /// Repository to ask about.
    dir: PathBuf,
    /// The question.
    question: String,
    /// Run directory (or checkpoint directory) of the model to ask.
    #[arg(long, value_name = "RUN_DIR")]
    model: PathBuf,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Softmax temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not read or write the saved prefix cache.
    #[arg(long)]
    no_cache: bool,
    /// Where prefix caches are kept [default: $MNEMO_CACHE or ~/.cache/mnemo].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TokenizerCmd {
    /// Train a byte-level BPE on a directory and save tokenizer.json.
    Train {
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Vocabulary size (including the 256 byte tokens and <|endoftext|>).
        #[arg(long, default_value_t = 4096)]
        vocab: usize,
        #[arg(long, default_value = "tokenizer.json")]
        out: PathBuf,
        /// Use at most this many bytes of text.
        #[arg(long, default_value_t = 64 << 20)]
        max_bytes: u64,
        #[arg(long, value_name = "GLOB")]
        include: Vec<String>,
        #[arg(long, value_name = "GLOB")]
        exclude: Vec<String>,
    },
}

#[derive(Subcommand)]
enum EngramCmd {
    /// Build the Engram compression table of a tokenizer: vocabulary size before and after,
    /// and the largest merge groups.
    Compress {
        #[arg(long, value_name = "FILE")]
        tokenizer: PathBuf,
        /// Merge groups to list.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Per Engram layer: orders, heads, table sizes (primes), rows, bytes, multipliers, of a
    /// run directory / checkpoint or a model config JSON file.
    Inspect {
        #[arg(value_name = "RUN_DIR_OR_CONFIG")]
        path: PathBuf,
    },
    /// Per-token gate values of every Engram layer over a text (one forward pass): which
    /// tokens use the memory. Writes JSON {tokens, layers: [{layer_id, gates: [[a per
    /// stream] per token]}]}.
    Gates {
        #[arg(value_name = "RUN_DIR")]
        run_dir: PathBuf,
        /// Text file to run.
        #[arg(long, value_name = "FILE")]
        text: PathBuf,
        /// Output JSON file.
        #[arg(long, value_name = "FILE")]
        json: PathBuf,
        /// Use at most this many tokens (at most the model's max_seq_len).
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Time full training steps (forward, backward, clip, AdamW, Engram tables' lazy Adam) on
    /// random tokens; prints JSON.
    TrainStep {
        #[command(flatten)]
        cfg: Box<ConfigArgs>,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Also time the same model without Engram, interleaved step by step; prints a JSON
        /// array (with Engram, without) and the ratio of median CPU times.
        #[arg(long)]
        vs_no_engram: bool,
        /// Also time the memory-only fine-tuning step (`--train-only engram`: frozen backbone),
        /// interleaved with the full step.
        #[arg(long)]
        vs_frozen: bool,
    },
    /// Forward throughput with a large Engram table in RAM vs memory-mapped (interleaved);
    /// prints JSON.
    EngramOffload {
        #[command(flatten)]
        cfg: Box<ConfigArgs>,
        /// Total table size in GB (rows per head scaled to fit).
        #[arg(long, default_value_t = 2.0)]
        table_gb: f64,
        /// Forward passes per mode.
        #[arg(long, default_value_t = 10)]
        reps: usize,
        /// Directory for the table file (deleted at the end).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Prefill and decode speed of a model (run directory or .gguf): prints JSON.
    Decode {
        /// Run directory, checkpoint directory or `.gguf` file.
        model: PathBuf,
        /// Prompt length in tokens (a repeated code snippet).
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Tokens to decode (greedy).
        #[arg(long, default_value_t = 64)]
        gen: usize,
    },
    /// Lookup-first decoding vs plain greedy decoding on one prompt: tokens/s, identical
    /// output, lossy thresholds; prints JSON.
    Lookup(lookup_cmd::BenchLookupArgs),
    /// Time of one forward over n rows (a verify pass / a decode batch) for each n; JSON.
    Rows {
        model: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6,7,8")]
        rows: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Context tokens before the rows (their K/V are in the cache).
        #[arg(long, default_value_t = 320)]
        prefix: usize,
        /// Use the exact quantised product for up to this many rows (beyond: the fast one).
        #[arg(long, default_value_t = 64)]
        quant_rows: usize,
    },
    /// Long context with a DSA model: prefill and decode time per token, sparse vs dense
    /// attention, at each context length; prints one JSON line per length (and --json FILE).
    LongContext {
        #[command(flatten)]
        cfg: Box<ConfigArgs>,
        /// Context lengths in tokens.
        #[arg(long, value_delimiter = ',', default_value = "4096,16384,65536,131072")]
        contexts: Vec<usize>,
        /// Tokens decoded per mode and length.
        #[arg(long, default_value_t = 16)]
        decode: usize,
        /// Store the indexer keys in 8 bits.
        #[arg(long)]
        int8: bool,
        /// Longest context whose dense prefill is timed (it grows quadratically).
        #[arg(long, default_value_t = 65536)]
        dense_prefill_max: usize,
        /// Fill the sparse cache with a window-local prefill (each prefill token attends to its
        /// last top-k positions; no indexer scan) to time decoding at contexts whose exact DSA
        /// prefill would take hours. Decoding stays exact DSA. The prefill time is then NOT the
        /// model's.
        #[arg(long)]
        window_prefill: bool,
        /// Write all rows as a JSON array here.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Lightning-indexer scan: scores of `queries` queries against `keys` cached keys, then
    /// top-k per query (f32 or 8-bit keys); prints JSON with ns per (query, key) pair.
    Indexer {
        #[arg(long, default_value_t = 131072)]
        keys: usize,
        #[arg(long, default_value_t = 1)]
        queries: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        #[arg(long, default_value_t = 32)]
        dim: usize,
        #[arg(long, default_value_t = 512)]
        topk: usize,
        /// Store the keys in 8 bits (one scale per key).
        #[arg(long)]
        int8: bool,
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
    /// f32 GEMM throughput of the gemm crate at n×n×n (the peak for MFU); prints JSON.
    Gemm {
        #[arg(long, default_value_t = 1024)]
        size: usize,
        #[arg(long, default_value_t = 10)]
        iters: usize,
    },
}

fn main() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("MNEMO_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
        Cmd::Train(a) => cmd_train(a),
        Cmd::Eval(a) => cmd_eval(a),
        Cmd::Pack(a) => {
            let code = pack_cmd::run(a)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Cmd::Ask(a) => cmd_ask(a),
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Engram(EngramCmd::Compress { tokenizer, top }) => {
            let tok = mnemo::tokenizer::Tokenizer::load(&tokenizer)?;
            let c = mnemo::engram::CompressedTokenizer::build(&tok)?;
            print!("{}", c.report(&tok, top));
            Ok(())
        }
        Cmd::Engram(EngramCmd::Inspect { path }) => {
            print!("{}", engram_inspect(&path)?);
            Ok(())
        }
        Cmd::Engram(EngramCmd::Gates {
            run_dir,
            text,
            json,
            max_tokens,
        }) => engram_gates(&run_dir, &text, &json, max_tokens),
        Cmd::Tokenizer(TokenizerCmd::Train {
            data,
            vocab,
            out,
            max_bytes,
            include,
            exclude,
        }) => {
            let mut spec = CorpusSpec::new(&data);
            spec.include = include;
            spec.exclude = exclude;
            spec.val_fraction = 0.0;
            let corpus = mnemo::data::scan(&spec)?;
            if vocab < 257 {
                bail!("--vocab {vocab} is too small: a byte-level BPE needs at least 257 entries");
            }
            eprintln!(
                "training a byte-level BPE (vocab {vocab}) on {} files under {}",
                corpus.files.len(),
                data.display()
            );
            let tok = mnemo::tokenizer::Tokenizer::train(
                mnemo::data::texts(&corpus, mnemo::data::Split::Train, max_bytes),
                vocab,
            )?;
            tok.save(&out)?;
            println!("wrote {} ({} tokens)", out.display(), tok.vocab_size());
            Ok(())
        }
        Cmd::Config(a) => {
            let (run, _) = resolve(&a)?;
            println!("{}", serde_json::to_string_pretty(&run)?);
            Ok(())
        }
        Cmd::Bench(BenchCmd::TrainStep {
            cfg,
            iters,
            warmup,
            vs_no_engram,
            vs_frozen,
        }) => {
            let (run, _) = resolve(&cfg)?;
            let (b, t, seed) = (run.train.batch_size, run.train.seq_len, run.train.seed);
            if !vs_no_engram && !vs_frozen {
                let r = mnemo::train::bench_steps(&run.model, b, t, iters.max(1), warmup, seed)?;
                println!("{}", serde_json::to_string(&r)?);
                return Ok(());
            }
            if run.model.engram.is_none() {
                bail!("--vs-no-engram / --vs-frozen need a model with Engram (e.g. --preset tiny-engram)");
            }
            use mnemo::train::BenchVariant;
            let mut vars = vec![BenchVariant {
                label: "engram".into(),
                cfg: run.model.clone(),
                frozen_backbone: false,
            }];
            if vs_no_engram {
                vars.push(BenchVariant {
                    label: "no-engram".into(),
                    cfg: mnemo::config::ModelConfig {
                        engram: None,
                        ..run.model.clone()
                    },
                    frozen_backbone: false,
                });
            }
            if vs_frozen {
                vars.push(BenchVariant {
                    label: "engram-frozen-backbone".into(),
                    cfg: run.model.clone(),
                    frozen_backbone: true,
                });
            }
            let r = mnemo::train::bench_steps_interleaved(&vars, b, t, iters.max(1), warmup, seed)?;
            for x in &r[1..] {
                let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
                eprintln!(
                    "{} / {}: median CPU time per step {:.3}, wall {:.3}",
                    r[0].label,
                    x.label,
                    ratio(r[0].step_cpu_ms_median, x.step_cpu_ms_median).unwrap_or(f64::NAN),
                    r[0].step_ms_median / x.step_ms_median
                );
            }
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Bench(BenchCmd::EngramOffload {
            cfg,
            table_gb,
            reps,
            dir,
        }) => {
            let (run, _) = resolve(&cfg)?;
            let r = mnemo::train::bench_offload(
                &run.model,
                (table_gb * 1e9) as u64,
                run.train.batch_size,
                run.train.seq_len,
                reps.max(1),
                &dir,
                run.train.seed,
            )?;
            eprintln!(
                "{:.2} GB table: RAM {:.0} tok/s, mapped {:.0} tok/s ({:+.2}% time; paired median {:+.2}%)",
                r.table_bytes as f64 / 1e9,
                r.ram_tokens_per_s_median,
                r.mapped_tokens_per_s_median,
                r.mapped_overhead_pct,
                r.mapped_overhead_pct_paired_median
            );
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        Cmd::Bench(BenchCmd::Decode {
            model,
            prompt_tokens,
            gen,
        }) => {
            let l = mnemo::checkpoint::load(&model, false)?;
            let text = "fn add(a: u32, b: u32) -> u32 {\n    a + b\n}\n".repeat(prompt_tokens);
            let mut prompt = l.tokenizer.encode(&text)?;
            prompt.truncate(prompt_tokens);
            if prompt.len() + gen > l.model.cfg.max_seq_len {
                bail!(
                    "--prompt-tokens + --gen exceed the model's context {}",
                    l.model.cfg.max_seq_len
                );
            }
            let mut cache = mnemo::generate::KvCache::new(&l.model);
            let t0 = std::time::Instant::now();
            let mut logits = l.model.forward_cached(&prompt, &mut cache)?;
            let prefill = t0.elapsed().as_secs_f64();
            let s = mnemo::generate::Sampling {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
            };
            let mut rng = mnemo::rng::Rng::new(0);
            let t1 = std::time::Instant::now();
            for _ in 0..gen {
                let t = mnemo::generate::sample(&logits, l.tokenizer.vocab_size(), s, &mut rng);
                logits = l.model.forward_cached(&[t], &mut cache)?;
            }
            let decode = t1.elapsed().as_secs_f64();
            println!(
                "{}",
                serde_json::json!({"impl": "mnemo", "threads": rayon::current_num_threads(), "prompt_tokens": prompt.len(),
                    "gen": gen, "prefill_tok_s": prompt.len() as f64 / prefill, "decode_tok_s": gen as f64 / decode})
            );
            Ok(())
        }
        Cmd::Bench(BenchCmd::Lookup(a)) => lookup_cmd::bench(a),
        Cmd::Bench(BenchCmd::Rows {
            model,
            rows,
            reps,
            prefix,
            quant_rows,
        }) => {
            mnemo::batch::set_quant_max_rows(quant_rows);
            lookup_cmd::bench_rows(&model, &rows, reps, prefix)
        }
        Cmd::Bench(BenchCmd::LongContext {
            cfg,
            contexts,
            decode,
            int8,
            dense_prefill_max,
            window_prefill,
            json,
        }) => bench_long_context(
            &cfg,
            contexts,
            decode,
            int8,
            dense_prefill_max,
            window_prefill,
            json,
        ),
        Cmd::Bench(BenchCmd::Indexer {
            keys,
            queries,
            heads,
            dim,
            topk,
            int8,
            reps,
        }) => bench_indexer(keys, queries, heads, dim, topk, int8, reps),
        Cmd::Bench(BenchCmd::Gemm { size, iters }) => {
            let r = mnemo::kernels::matmul::bench_gemm(size, iters.max(1));
            println!(
                "{}",
                serde_json::json!({"size": size, "threads": rayon::current_num_threads(), "gflops_median": r})
            );
            Ok(())
        }
    }
}

/// `mnemo engram gates`: one forward pass over the first tokens of `text`, gate values per
/// Engram layer and token.
fn engram_gates(run_dir: &Path, text: &Path, out: &Path, max_tokens: usize) -> Result<()> {
    let l = mnemo::checkpoint::load(run_dir, false)?;
    let e = l.model.engram.as_ref().with_context(|| {
        format!(
            "{}: the model has no Engram (`engram` is not set)",
            run_dir.display()
        )
    })?;
    let src =
        std::fs::read_to_string(text).with_context(|| format!("cannot read {}", text.display()))?;
    let mut ids = l.tokenizer.encode(&src)?;
    ids.truncate(max_tokens.min(l.model.cfg.max_seq_len));
    if ids.is_empty() {
        bail!("{}: no tokens", text.display());
    }
    l.model.check_engram_tokens(&ids)?;
    l.model.check_engram_tables()?;
    let mut ws = mnemo::model::Workspace::default();
    l.model.forward(&ids, 1, ids.len(), &mut ws);
    let toks: Vec<String> = ids
        .iter()
        .map(|&i| l.tokenizer.decode(&[i]).unwrap_or_default())
        .collect();
    let nb = mnemo::model::engram_gate_spec(&l.model.cfg).n_branch;
    let layers: Vec<serde_json::Value> = e
        .layers
        .iter()
        .zip(ws.engram_gates())
        .map(|(lay, g)| {
            let rows: Vec<&[f32]> = g.chunks(nb).collect();
            serde_json::json!({"layer_id": lay.hash.layer_id, "gates": rows})
        })
        .collect();
    let v = serde_json::json!({"run": run_dir, "text": text, "token_ids": ids, "tokens": toks, "streams": nb, "layers": layers});
    std::fs::write(out, serde_json::to_string(&v)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!(
        "{} tokens, {} Engram layers -> {}",
        ids.len(),
        e.layers.len(),
        out.display()
    );
    Ok(())
}

/// `mnemo engram inspect`: a run directory / checkpoint (the stored hashes and tables), or a
/// model config JSON (a fresh Engram with an identity compression over `vocab_size`, since no
/// tokenizer is known: the multipliers then differ from a trained run's).
fn engram_inspect(path: &Path) -> Result<String> {
    if path.is_file() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        // A model config, or a run config ({"model": {...}, ...}).
        let m = v.get("model").cloned().unwrap_or(v);
        let cfg: ModelConfig = serde_json::from_value(m)
            .with_context(|| format!("{} is not a valid model config", path.display()))?;
        cfg.validate()
            .with_context(|| format!("in {}", path.display()))?;
        if cfg.engram.is_none() {
            bail!(
                "{}: the model has no Engram (`engram` is not set)",
                path.display()
            );
        }
        let model = mnemo::model::Model::new(cfg)?;
        let e = model.engram.as_ref().context("engram")?;
        return Ok(format!(
            "(config only: identity compression over the model vocabulary; a trained run uses its tokenizer's)\n{}",
            e.inspect_text()
        ));
    }
    let l = mnemo::checkpoint::load(path, false)?;
    let e = l.model.engram.as_ref().with_context(|| {
        format!(
            "{}: the model has no Engram (`engram` is not set)",
            path.display()
        )
    })?;
    Ok(e.inspect_text())
}

/// Preset → config file → flags → `--set`, then deserialised (unknown fields are errors).
fn resolve(a: &ConfigArgs) -> Result<(RunConfig, String)> {
    let mut file: serde_json::Value = serde_json::json!({});
    if let Some(p) = &a.config {
        let s = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read config file {}", p.display()))?;
        file = serde_json::from_str(&s)
            .with_context(|| format!("config file {} is not valid JSON", p.display()))?;
        if !file.is_object() {
            bail!("config file {} must hold a JSON object", p.display());
        }
    }
    let init = a.init.as_ref().map(|p| init_base(p)).transpose()?;
    let preset = a
        .preset
        .clone()
        .or_else(|| {
            file.get("preset")
                .and_then(|v| v.as_str())
                .map(String::from)
        })
        .unwrap_or_else(|| "tiny".into());
    let model = ModelConfig::preset(&preset).with_context(|| {
        format!(
            "unknown preset `{preset}` (available: {})",
            ModelConfig::PRESETS.join(", ")
        )
    })?;
    let data_root = a.data.clone().unwrap_or_else(|| PathBuf::from("."));
    let mut v = match init {
        Some(base) => base,
        None => serde_json::json!({
            "model": model,
            "train": TrainConfig::default(),
            "data": CorpusSpec::new(data_root),
        }),
    };
    if v["train"].get("synthetic").is_none() {
        v["train"]["synthetic"] = serde_json::Value::Null;
    }
    if v["train"].get("keep_steps").is_none() {
        v["train"]["keep_steps"] = serde_json::json!([]);
    }
    // Optional model fields that a plain config does not serialise, so that `--set` finds them.
    for (k, val) in mnemo::config::ModelConfig::optional_fields() {
        if v["model"].get(k).is_none() {
            v["model"][k] = val;
        }
    }
    for section in ["model", "train", "data"] {
        if let Some(obj) = file.get(section) {
            let o = obj
                .as_object()
                .with_context(|| format!("config file: `{section}` must be an object"))?;
            for (k, val) in o {
                v[section][k] = val.clone();
            }
        }
    }
    if let Some(obj) = file.as_object() {
        for k in obj.keys() {
            if !["preset", "model", "train", "data"].contains(&k.as_str()) {
                bail!("config file: unknown top-level key `{k}` (expected preset, model, train, data)");
            }
        }
    }
    let t = &mut v["train"];
    if let Some(x) = a.steps {
        t["max_steps"] = x.into();
    }
    if let Some(x) = a.batch_size {
        t["batch_size"] = x.into();
    }
    if let Some(x) = a.seq_len {
        t["seq_len"] = x.into();
    }
    if let Some(x) = a.lr {
        t["lr"] = x.into();
        t["min_lr"] = (x / 10.0).into();
    }
    if let Some(x) = a.seed {
        t["seed"] = x.into();
    }
    if let Some(x) = a.dsa_stage {
        t["dsa_stage"] = x.name().into();
    }
    if let Some(task) = &a.synthetic {
        let task: mnemo::longctx::Task = task.parse().context("--synthetic")?;
        let loss: mnemo::longctx::SyntheticLoss = a
            .synthetic_loss
            .as_deref()
            .unwrap_or("all")
            .parse()
            .context("--synthetic-loss")?;
        t["synthetic"] = serde_json::json!({
            "task": task,
            "fraction": a.synthetic_mix.unwrap_or(1.0),
            "loss": loss,
        });
    }
    if let Some(f) = a.rope_scaling_factor {
        let m: ModelConfig =
            serde_json::from_value(v["model"].clone()).context("invalid model config")?;
        let orig = m
            .rope_scaling
            .as_ref()
            .map_or(m.max_seq_len, |r| r.original_max_position_embeddings);
        let mut rs = m
            .rope_scaling
            .clone()
            .unwrap_or_else(|| mnemo::kernels::rope::RopeScaling::yarn(f, orig));
        rs.factor = f;
        if !(f.is_finite() && f >= 1.0) {
            bail!("--rope-scaling-factor {f}: must be a number >= 1");
        }
        v["model"]["max_seq_len"] = rs.max_context().into();
        v["model"]["rope_scaling"] = serde_json::to_value(rs)?;
    }
    if a.data.is_some() {
        v["data"]["root"] = serde_json::to_value(a.data.clone())?;
    }
    if !a.include.is_empty() {
        v["data"]["include"] = serde_json::to_value(&a.include)?;
    }
    if !a.exclude.is_empty() {
        v["data"]["exclude"] = serde_json::to_value(&a.exclude)?;
    }
    for s in &a.sets {
        let (key, val) = s
            .split_once('=')
            .with_context(|| format!("--set {s}: expected KEY=VALUE"))?;
        let parsed: serde_json::Value = serde_json::from_str(val)
            .unwrap_or_else(|_| serde_json::Value::String(val.to_string()));
        // `engram.FIELD` / `model.engram.FIELD`: one field of the Engram config (the preset's,
        // or the defaults when the preset has none); `engram=null` turns it off.
        if let Some(f) = key
            .strip_prefix("model.engram.")
            .or_else(|| key.strip_prefix("engram."))
        {
            let e = &mut v["model"]["engram"];
            if e.is_null() {
                *e = serde_json::to_value(mnemo::engram::EngramConfig::default())?;
            }
            e[f] = parsed;
            continue;
        }
        // `dsa.FIELD` / `model.dsa.FIELD`: one field of the DSA config (the preset's, or
        // the tiny-dsa values when the preset has none); `dsa=null` turns it off.
        if let Some(f) = key
            .strip_prefix("model.dsa.")
            .or_else(|| key.strip_prefix("dsa."))
        {
            let e = &mut v["model"]["dsa"];
            if e.is_null() {
                *e = serde_json::to_value(ModelConfig::preset("tiny-dsa").and_then(|c| c.dsa))?;
            }
            if e.get(f).is_none() {
                bail!("--set {s}: no DSA config field `{f}` (index_n_heads, index_head_dim, index_rope_dim, index_topk)");
            }
            e[f] = parsed;
            continue;
        }
        let (section, field) = match key.split_once('.') {
            Some((sec, f)) => (sec.to_string(), f.to_string()),
            None => {
                let sec = ["model", "train", "data"]
                    .into_iter()
                    .find(|sec| v[*sec].get(key).is_some())
                    .with_context(|| {
                        format!("--set {s}: no config field named `{key}` (see `mnemo config`)")
                    })?;
                (sec.to_string(), key.to_string())
            }
        };
        if v.get(&section).is_none() || v[&section].get(&field).is_none() {
            bail!("--set {s}: no config field `{section}.{field}` (see `mnemo config`)");
        }
        v[&section][&field] = parsed;
    }
    let run: RunConfig = serde_json::from_value(v).context("invalid config")?;
    run.model.validate()?;
    run.train.validate(&run.model)?;
    Ok((run, preset))
}

fn cmd_train(a: TrainArgs) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without saving");
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)"
            );
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let cache_root = a
        .cache_dir
        .clone()
        .unwrap_or_else(mnemo::data::default_cache_root);
    let start = if let (Some(init), Some(w)) = (&a.cfg.init, &a.train_only) {
        // Memory-only fine-tuning (Engram): weights, tokenizer and tables from the run.
        if a.cfg.preset.is_some() || a.cfg.config.is_some() {
            bail!(
                "--init takes the model from {}: --preset/--config cannot be given with it",
                init.display()
            );
        }
        if a.cfg.data.is_none() {
            bail!("--init needs --data DIR (the text to train on)");
        }
        let (mut run, _) = resolve(&a.cfg)?;
        run.train.init = Some(init.clone());
        run.train.train_only = mnemo::finetune::TrainOnly::parse(w)?;
        Start::Init { run: Box::new(run) }
    } else if a.resume.is_some() {
        // The run's own config is authoritative; only the step budget may change.
        let c = &a.cfg;
        let other = c.preset.is_some()
            || c.config.is_some()
            || !c.sets.is_empty()
            || c.data.is_some()
            || !c.include.is_empty()
            || !c.exclude.is_empty()
            || c.batch_size.is_some()
            || c.seq_len.is_some()
            || c.lr.is_some()
            || c.seed.is_some()
            || c.init.is_some()
            || c.rope_scaling_factor.is_some()
            || c.synthetic.is_some()
            || a.tokenizer.is_some();
        if other {
            bail!(
                "--resume continues a run with its own config: only --steps and --dsa-stage may be given with it"
            );
        }
        Start::Resume {
            max_steps: c.steps,
            dsa_stage: c.dsa_stage,
        }
    } else {
        let (run, preset) = resolve(&a.cfg)?;
        if a.cfg.data.is_none() && a.cfg.config.is_none() && a.cfg.init.is_none() {
            let here = std::env::current_dir()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| ".".into());
            eprintln!("no --data given: training the `{preset}` preset on the source files of the current directory ({here})");
        }
        Start::Fresh {
            run: Box::new(run),
            tokenizer: a.tokenizer.clone(),
            init: a.cfg.init.clone(),
        }
    };
    let out = match (&a.resume, &a.out) {
        (Some(dir), _) => dir.clone(),
        (None, Some(o)) => o.clone(),
        (None, None) if a.cfg.init.is_some() => bail!("--init needs --out NEW_RUN_DIR"),
        (None, None) => free_run_dir(a.cfg.preset.as_deref().unwrap_or("tiny")),
    };
    if a.resume.is_none() {
        eprintln!("run directory: {}", out.display());
    }
    let opts = TrainOptions {
        out,
        start,
        cache_root,
        progress: !a.quiet,
    };
    let out = opts.out.clone();
    let s = mnemo::train::train(opts, &stop)?;
    if s.stopped_early {
        eprintln!(
            "stopped at step {}; resume with: mnemo train --resume {}",
            s.steps,
            out.display()
        );
        std::process::exit(130);
    }
    match (s.val_loss, s.val_bpb) {
        (Some(l), Some(b)) => eprintln!(
            "done: {} steps, train loss {:.4}, val loss {l:.4} nats/token ({b:.4} bits/byte) vs unigram entropy {:.3}; {:.0} tok/s",
            s.steps, s.final_loss, s.unigram_entropy, s.tokens_per_s
        ),
        _ => eprintln!("done: {} steps, train loss {:.4} (no validation split)", s.steps, s.final_loss),
    }
    eprintln!(
        "sample with: mnemo generate {} --prompt 'fn main'",
        out.display()
    );
    Ok(())
}

fn free_run_dir(preset: &str) -> PathBuf {
    let base = Path::new("runs");
    let first = base.join(preset);
    if !first.exists() {
        return first;
    }
    (2..)
        .map(|i| base.join(format!("{preset}-{i}")))
        .find(|p| !p.exists())
        .expect("unbounded")
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    if let Some(b) = a.bench {
        return eval_cmd::run(b);
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
            "val loss {loss:.4} nats/token, {bpb:.4} bits/byte ({} val tokens, {windows} windows of {t}){}",
            cache.val.n_tokens,
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

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!("--temperature must be >= 0");
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let l = mnemo::checkpoint::load(&a.run_dir, false)?;
    let tok = &l.tokenizer;
    let prompt = if a.chat {
        if tok.chat_template().is_none() {
            bail!("{} has no chat template; drop --chat", a.run_dir.display());
        }
        let (before, after) = mnemo::chat::split_prompt(tok)?;
        tok.encode_with_special(&format!("{before}{}{after}", a.prompt))?
    } else {
        tok.encode(&a.prompt)?
    };
    let room = l.model.cfg.max_seq_len.saturating_sub(prompt.len());
    if room == 0 {
        bail!(
            "the prompt is {} tokens, at or beyond the model's maximum context of {} tokens \
             (max_seq_len): shorten it",
            prompt.len(),
            l.model.cfg.max_seq_len
        );
    }
    let s = mnemo::generate::Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    let mut stdout = std::io::stdout().lock();
    if !a.chat {
        write!(stdout, "{}", a.prompt)?;
    }
    stdout.flush()?;
    let mut cache = mnemo::generate::KvCache::new(&l.model);
    if a.lookup || a.lookup_threshold.is_some() {
        if let Some(p) = a.lookup_threshold {
            if !(p > 0.0 && p <= 1.0) {
                bail!("--lookup-threshold must be in (0, 1]");
            }
        }
        let cfg = mnemo::lookup::LookupConfig {
            threshold: a.lookup_threshold,
            ..Default::default()
        };
        let st = lookup_cmd::stream_lookup(
            &l.model,
            tok,
            &mut cache,
            &prompt,
            a.max_tokens.min(room),
            s,
            a.seed,
            cfg,
            &mut stdout,
        )?;
        writeln!(stdout)?;
        eprintln!(
            "lookup: {} passes, {} drafted, {} accepted, {} unverified",
            st.passes, st.drafted, st.accepted, st.unverified
        );
        return Ok(());
    }
    stream_answer(
        &l.model,
        tok,
        &mut cache,
        &prompt,
        a.max_tokens.min(room),
        s,
        a.seed,
        &mut stdout,
    )?;
    writeln!(stdout)?;
    Ok(())
}

fn cmd_ask(a: AskArgs) -> Result<()> {
    let l = mnemo::checkpoint::load(&a.model, false)?;
    let (model, tok) = (&l.model, &l.tokenizer);
    // With a chat template: [user header] context "Question: …" [end of turn, assistant header];
    // without: context "Question: … Answer:". Only the part up to the context is cached.
    let (before, after) = mnemo::chat::split_prompt(tok)?;
    let head = tok.encode_with_special(&before)?;
    let suffix = if tok.chat_template().is_some() {
        tok.encode_with_special(&format!("\n\nQuestion: {}{after}", a.question))?
    } else {
        tok.encode(&format!("\n\nQuestion: {}\nAnswer:", a.question))?
    };
    let ctx = model
        .cfg
        .max_seq_len
        .saturating_sub(head.len() + suffix.len() + a.max_tokens);
    if ctx == 0 {
        bail!(
            "the model's context ({} tokens) leaves no room for the repository after the question and \
             --max-tokens {}",
            model.cfg.max_seq_len,
            a.max_tokens
        );
    }
    let t0 = std::time::Instant::now();
    let mut opts = mnemo_pack::PackOptions::new(&a.dir);
    opts.max_tokens = Some(ctx);
    opts.query = Some(a.question.clone());
    let pack = mnemo_pack::pack(&opts, Some(tok))?;
    let mut prefix = tok.encode(&mnemo_pack::context_text(&pack))?;
    if prefix.len() > ctx {
        // File headers and separators are not in the per-file budget; cut the tail.
        prefix.truncate(ctx);
    }
    prefix.splice(0..0, head);
    if prefix.is_empty() {
        prefix.push(tok.eot());
    }
    eprintln!(
        "context: {} files, {} tokens of {} (packed in {:.2}s)",
        pack.files.len(),
        prefix.len(),
        model.cfg.max_seq_len,
        t0.elapsed().as_secs_f64()
    );
    let key = {
        let bytes: Vec<u8> = prefix.iter().flat_map(|x| x.to_le_bytes()).collect();
        mnemo::util::fnv1a64(&bytes) ^ mnemo::generate::model_fingerprint(model)
    };
    let root = a
        .cache_dir
        .clone()
        .unwrap_or_else(mnemo::data::default_cache_root);
    let path = root.join("prefix").join(format!("{key:016x}.safetensors"));
    let t1 = std::time::Instant::now();
    let mut cache = match (!a.no_cache && path.is_file())
        .then(|| mnemo::generate::KvCache::load(&path, model))
    {
        Some(Ok((c, toks))) if toks == prefix => {
            eprintln!(
                "prefix cache hit: {} ({:.2}s, no prefill)",
                path.display(),
                t1.elapsed().as_secs_f64()
            );
            c
        }
        other => {
            if let Some(Err(e)) = other {
                eprintln!("ignoring unusable prefix cache: {e:#}");
            }
            let mut c = mnemo::generate::KvCache::new(model);
            model.forward_cached(&prefix, &mut c)?;
            eprintln!(
                "prefilled {} tokens in {:.2}s",
                prefix.len(),
                t1.elapsed().as_secs_f64()
            );
            if !a.no_cache {
                c.save(&path, model, &prefix)?;
            }
            c
        }
    };
    let s = mnemo::generate::Sampling {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    let mut stdout = std::io::stdout().lock();
    stream_answer(
        model,
        tok,
        &mut cache,
        &suffix,
        a.max_tokens,
        s,
        a.seed,
        &mut stdout,
    )?;
    writeln!(stdout)?;
    Ok(())
}

/// Prefill `tokens` after what `cache` holds, then sample up to `max_new` tokens, writing the
/// text to `out` as it is produced; stops at the tokenizer's end-of-text token.
#[allow(clippy::too_many_arguments)]
fn stream_answer(
    model: &mnemo::model::Model,
    tok: &mnemo::tokenizer::Tokenizer,
    cache: &mut mnemo::generate::KvCache,
    tokens: &[u32],
    max_new: usize,
    s: mnemo::generate::Sampling,
    seed: u64,
    out: &mut impl Write,
) -> Result<()> {
    let mut stream = mnemo::tokenizer::StreamDecoder::new(tok);
    let n_valid = tok.vocab_size();
    mnemo::generate::generate_after(
        model,
        cache,
        tokens,
        max_new,
        s,
        seed,
        n_valid,
        Some(tok.eot()),
        |t| {
            write!(out, "{}", stream.push(t)?)?;
            Ok(out.flush()?)
        },
    )?;
    Ok(())
}

/// `mnemo bench indexer`: time the indexer scan and the top-k over a synthetic key cache.
fn bench_indexer(
    keys: usize,
    queries: usize,
    heads: usize,
    dim: usize,
    topk: usize,
    int8: bool,
    reps: usize,
) -> Result<()> {
    use mnemo::kernels::indexer::{scores, topk as select, KeyStore};
    if keys == 0 || queries == 0 || heads == 0 || dim == 0 || topk == 0 {
        bail!("--keys, --queries, --heads, --dim and --topk must be > 0");
    }
    if int8 && !dim.is_multiple_of(4) {
        bail!("--int8 needs --dim to be a multiple of 4 (got {dim})");
    }
    let mut rng = mnemo::rng::Rng::new(1);
    let mut store = KeyStore::new(dim, keys, int8);
    let mut k = vec![0.0f32; 4096 * dim];
    let mut left = keys;
    while left > 0 {
        let n = left.min(4096);
        rng.fill_normal(&mut k[..n * dim], 1.0);
        store.push(&k[..n * dim]);
        left -= n;
    }
    let mut q = vec![0.0f32; queries * heads * dim];
    rng.fill_normal(&mut q, 1.0);
    let mut w = vec![0.0f32; queries * heads];
    rng.fill_normal(&mut w, 1.0);
    // Causal: the queries are the last `queries` positions.
    let limit: Vec<usize> = (0..queries).map(|i| keys - queries + 1 + i).collect();
    let (mut out, mut sel) = (Vec::new(), Vec::new());
    let (mut ts, mut tk, mut tf) = (Vec::new(), Vec::new(), Vec::new());
    let mut idx = vec![0i32; queries * topk];
    for _ in 0..reps.max(1) {
        let t0 = std::time::Instant::now();
        let width = scores(&q, &w, heads, &store, &limit, &mut out);
        let t1 = std::time::Instant::now();
        for (i, &lim) in limit.iter().enumerate() {
            select(&out[i * width..i * width + lim], topk, &mut sel);
        }
        ts.push(t1.duration_since(t0).as_secs_f64());
        tk.push(t1.elapsed().as_secs_f64());
        let t2 = std::time::Instant::now();
        mnemo::kernels::indexer::select(&q, &w, heads, &store, &limit, topk, topk, &mut idx);
        tf.push(t2.elapsed().as_secs_f64());
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (s, t, f) = (med(&mut ts), med(&mut tk), med(&mut tf));
    let pairs = (queries * keys) as f64;
    println!(
        "{}",
        serde_json::json!({
            "keys": keys, "queries": queries, "heads": heads, "dim": dim, "topk": topk,
            "int8": int8, "threads": rayon::current_num_threads(),
            "scores_s": s, "topk_s": t,
            "ns_per_pair_scores": s / pairs * 1e9, "ns_per_pair_topk": t / pairs * 1e9,
            "select_s": f, "ns_per_pair_select": f / pairs * 1e9,
            "key_bytes": store.bytes_used(),
        })
    );
    Ok(())
}

/// `mnemo bench long-context`: dense vs sparse prefill/decode of a DSA model.
fn bench_long_context(
    a: &ConfigArgs,
    contexts: Vec<usize>,
    decode: usize,
    int8: bool,
    dense_prefill_max: usize,
    window_prefill: bool,
    json: Option<PathBuf>,
) -> Result<()> {
    use mnemo::dsa::bench::{long_context, LongContextBench};
    let (run, _) = resolve(a)?;
    let mut cfg = run.model.clone();
    let need = contexts.iter().copied().max().unwrap_or(0) + 2 * decode + 1;
    cfg.max_seq_len = cfg.max_seq_len.max(need);
    let dsa = cfg
        .dsa
        .clone()
        .context("bench long-context needs a DSA model (e.g. --preset small-dsa)")?;
    let mut model = mnemo::model::Model::new(cfg.clone())?;
    model.init(run.train.seed);
    eprintln!(
        "model: {} layers, d {}, {} heads × {} (kv {}), indexer {} heads × {}, top-k {}, {} keys, {} threads",
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        cfg.head_dim,
        cfg.n_kv_heads,
        dsa.index_n_heads,
        dsa.index_head_dim,
        dsa.index_topk,
        if int8 { "8-bit" } else { "f32" },
        rayon::current_num_threads()
    );
    let bench = LongContextBench {
        contexts,
        decode: decode.max(1),
        index_keys_8bit: int8,
        dense_prefill_max,
        window_prefill,
        seed: run.train.seed,
    };
    let t0 = std::time::Instant::now();
    let mut last_print = 0.0f64;
    let rows = long_context(
        &model,
        &bench,
        &mut |what, done, total| {
            let el = t0.elapsed().as_secs_f64();
            if el - last_print > 2.0 || done == total {
                last_print = el;
                eprint!("\r{what}: {done}/{total} tokens ({el:.0} s)      ");
                if done == total {
                    eprintln!();
                }
            }
        },
        &mut |row| println!("{}", serde_json::to_string(row).unwrap_or_default()),
    )?;
    if let Some(p) = json {
        let out = serde_json::json!({
            "config": cfg, "threads": rayon::current_num_threads(), "int8_index_keys": int8,
            "window_prefill": window_prefill,
            "decode_tokens": decode, "rows": rows,
        });
        std::fs::write(&p, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
