//! `mnemo bench`: training-step time (vs no Engram / a frozen backbone), Engram offload,
//! prefill/decode speed, lookup-first decoding, rows per forward, DSA long context, the
//! lightning-indexer scan, and the GEMM peak; each prints JSON.

use crate::config_cmd::{resolve, ConfigArgs};
use crate::lookup_cmd;
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum BenchCmd {
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
        /// Also time the same model without its MTP blocks (DeepSeek-V4), interleaved step by
        /// step; prints a JSON array (with MTP, without) and the ratio of median times.
        #[arg(long)]
        vs_no_mtp: bool,
        /// Also time named spans inside the step (each sublayer's forward and backward, the
        /// residual mixing around them, head, MTP, clip, AdamW, MoE balancing) and print their
        /// medians as `profile_ms`; costs a few microseconds per span.
        #[arg(long)]
        profile: bool,
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
    /// Memory read bandwidth (the bound of memory-bound decoding): a buffer far larger than
    /// the caches read `--reps` times by `--threads` threads; prints JSON (GB/s per pass,
    /// median, best).
    Membw {
        /// Buffer size in GiB.
        #[arg(long, default_value_t = 1.0)]
        gib: f64,
        #[arg(long, default_value_t = 10)]
        reps: usize,
    },
    /// Lookup-first decoding vs plain greedy decoding on one prompt: tokens/s, identical
    /// output, lossy thresholds; prints JSON.
    Lookup(lookup_cmd::BenchLookupArgs),
    /// MTP speculative decoding (DeepSeek-V4) vs plain greedy vs lookup-first decoding on a
    /// few prompts, rounds alternating: decode tokens/s, acceptance rate, identical output;
    /// prints JSON.
    Speculate(crate::speculate_cmd::BenchSpeculateArgs),
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
    /// GEMM throughput at n×n×n (the peak for MFU), or at `--shape MxKxN`: f32 (the gemm
    /// crate) or bf16 mixed precision (bf16 operands, f32 accumulation); prints JSON.
    Gemm {
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// `MxKxN` (e.g. 2048x512x1536) instead of size³.
        #[arg(long)]
        shape: Option<String>,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Operand precision: `f32`, or `bf16` (rounded operands, f32 accumulation; the
        /// AVX-512 BF16 kernel when the CPU has it, else round-then-f32).
        #[arg(long, default_value = "f32", value_parser = parse_precision)]
        precision: mnemo::kernels::precision::Precision,
    },
}

pub fn run(cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::TrainStep {
            cfg,
            iters,
            warmup,
            vs_no_engram,
            vs_frozen,
            vs_no_mtp,
            profile,
        } => {
            mnemo::prof::enable(profile);
            // As `mnemo train` does: steps reuse the heap pages of the step before.
            mnemo::heap::keep_freed_memory();
            if vs_no_mtp {
                train_step_vs_no_mtp(&cfg, iters, warmup)
            } else {
                train_step(&cfg, iters, warmup, vs_no_engram, vs_frozen)
            }
        }
        BenchCmd::EngramOffload {
            cfg,
            table_gb,
            reps,
            dir,
        } => engram_offload(&cfg, table_gb, reps, &dir),
        BenchCmd::Decode {
            model,
            prompt_tokens,
            gen,
        } => decode(&model, prompt_tokens, gen),
        BenchCmd::Membw { gib, reps } => {
            if !(gib > 0.0 && gib.is_finite()) {
                bail!("--gib must be a positive number of GiB, got {gib}");
            }
            let m = mnemo::bench::membw::measure((gib * (1u64 << 30) as f64) as usize, reps);
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
        BenchCmd::Lookup(a) => lookup_cmd::bench(a),
        BenchCmd::Speculate(a) => crate::speculate_cmd::bench(a),
        BenchCmd::Rows {
            model,
            rows,
            reps,
            prefix,
            quant_rows,
        } => {
            mnemo::batch::set_quant_max_rows(quant_rows);
            lookup_cmd::bench_rows(&model, &rows, reps, prefix)
        }
        BenchCmd::LongContext {
            cfg,
            contexts,
            decode,
            int8,
            dense_prefill_max,
            window_prefill,
            json,
        } => bench_long_context(
            &cfg,
            contexts,
            decode,
            int8,
            dense_prefill_max,
            window_prefill,
            json,
        ),
        BenchCmd::Indexer {
            keys,
            queries,
            heads,
            dim,
            topk,
            int8,
            reps,
        } => bench_indexer(keys, queries, heads, dim, topk, int8, reps),
        BenchCmd::Gemm {
            size,
            shape,
            iters,
            precision,
        } => gemm(size, shape.as_deref(), iters, precision),
    }
}

/// `mnemo bench train-step`: full training steps on random tokens; with `--vs-no-engram` /
/// `--vs-frozen`, the same model without Engram / with a frozen backbone, interleaved.
fn train_step(
    cfg: &ConfigArgs,
    iters: usize,
    warmup: usize,
    vs_no_engram: bool,
    vs_frozen: bool,
) -> Result<()> {
    let (run, _) = resolve(cfg)?;
    let (b, t, seed) = (run.train.batch_size, run.train.seq_len, run.train.seed);
    mnemo::kernels::precision::set_gemm_precision(run.train.precision);
    if !vs_no_engram && !vs_frozen {
        let r = mnemo::train::bench_steps(&run.model, b, t, iters.max(1), warmup, seed)?;
        println!("{}", with_precision(&r, run.train.precision)?);
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
    println!("{}", with_precision(&r, run.train.precision)?);
    Ok(())
}

/// A benchmark result (an object, or an array of them) as JSON with a `precision` field in
/// each object.
fn with_precision<T: serde::Serialize>(
    r: &T,
    p: mnemo::config::Precision,
) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(r)?;
    let add = |o: &mut serde_json::Value| {
        if let Some(m) = o.as_object_mut() {
            m.insert("precision".into(), p.name().into());
        }
    };
    match v.as_array_mut() {
        Some(a) => a.iter_mut().for_each(add),
        None => add(&mut v),
    }
    Ok(v)
}

/// `mnemo bench train-step --vs-no-mtp`: the model with its MTP blocks (trained with the
/// default `mtp_weight`) and without, interleaved step by step.
fn train_step_vs_no_mtp(cfg: &ConfigArgs, iters: usize, warmup: usize) -> Result<()> {
    let (run, _) = resolve(cfg)?;
    let (b, t, seed) = (run.train.batch_size, run.train.seq_len, run.train.seed);
    mnemo::kernels::precision::set_gemm_precision(run.train.precision);
    if run.model.mtp_layers() == 0 {
        bail!("--vs-no-mtp needs a model with MTP blocks (e.g. --preset v4-tiny)");
    }
    use mnemo::train::BenchVariant;
    let vars = [
        BenchVariant {
            label: "mtp".into(),
            cfg: run.model.clone(),
            frozen_backbone: false,
        },
        BenchVariant {
            label: "no-mtp".into(),
            cfg: run.model.without_mtp(),
            frozen_backbone: false,
        },
    ];
    let r = mnemo::train::bench_steps_interleaved(&vars, b, t, iters.max(1), warmup, seed)?;
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let tps = |x: &mnemo::train::StepBench| (b * t) as f64 / (x.step_ms_median / 1e3);
    eprintln!(
        "mtp / no-mtp: median CPU time per step {:.3}, wall {:.3}; {:.0} vs {:.0} tok/s",
        ratio(r[0].step_cpu_ms_median, r[1].step_cpu_ms_median).unwrap_or(f64::NAN),
        r[0].step_ms_median / r[1].step_ms_median,
        tps(&r[0]),
        tps(&r[1])
    );
    println!("{}", with_precision(&r, run.train.precision)?);
    Ok(())
}

/// `mnemo bench engram-offload`: forward throughput with the Engram tables in RAM vs mapped.
fn engram_offload(cfg: &ConfigArgs, table_gb: f64, reps: usize, dir: &Path) -> Result<()> {
    let (run, _) = resolve(cfg)?;
    let r = mnemo::train::bench_offload(
        &run.model,
        (table_gb * 1e9) as u64,
        run.train.batch_size,
        run.train.seq_len,
        reps.max(1),
        dir,
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

/// `mnemo bench decode`: prefill and greedy decode speed on a repeated code snippet.
fn decode(model: &Path, prompt_tokens: usize, gen: usize) -> Result<()> {
    let l = mnemo::checkpoint::load(model, false)?;
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

/// `--precision f32|bf16`.
pub(crate) fn parse_precision(s: &str) -> Result<mnemo::kernels::precision::Precision, String> {
    s.parse()
}

/// `mnemo bench gemm`: GEMM throughput at `size`³ or `shape` (median GFLOP/s).
fn gemm(
    size: usize,
    shape: Option<&str>,
    iters: usize,
    precision: mnemo::kernels::precision::Precision,
) -> Result<()> {
    let (m, k, n) = match shape {
        None => (size, size, size),
        Some(s) => {
            let d: Vec<usize> = s
                .split('x')
                .map(|x| x.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .ok()
                .filter(|d: &Vec<usize>| d.len() == 3 && d.iter().all(|&x| x > 0))
                .with_context(|| format!("--shape {s}: expected MxKxN with M, K, N > 0"))?;
            (d[0], d[1], d[2])
        }
    };
    if m == 0 {
        bail!("--size must be > 0");
    }
    let r = mnemo::kernels::matmul::bench_gemm_shape(m, k, n, iters.max(1), precision);
    let mut j = serde_json::json!({"size": size, "threads": rayon::current_num_threads(),
        "gflops_median": r, "precision": precision.name()});
    if let Some(o) = j.as_object_mut().filter(|_| shape.is_some()) {
        o.remove("size");
        o.insert("shape".into(), serde_json::json!([m, k, n]));
    }
    println!("{j}");
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
    use mnemo::bench::long_context::{long_context, LongContextBench};
    let (run, _) = resolve(a)?;
    let mut cfg = run.model.clone();
    let need = contexts.iter().copied().max().unwrap_or(0) + 2 * decode + 1;
    cfg.max_seq_len = cfg.max_seq_len.max(need);
    let (ih, id, topk) = match (&cfg.dsa, &cfg.v4) {
        (Some(d), _) => (d.index_n_heads, d.index_head_dim, d.index_topk),
        (None, Some(v)) => (v.index_n_heads, v.index_head_dim, v.index_topk),
        _ => bail!(
            "bench long-context needs a DSA or DeepSeek-V4 model (e.g. --preset small-dsa or v4-small)"
        ),
    };
    let mut model = mnemo::model::Model::new(cfg.clone())?;
    model.init(run.train.seed);
    eprintln!(
        "model: {} layers, d {}, {} heads × {} (kv {}), indexer {} heads × {}, top-k {}, {} keys, {} threads",
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        cfg.head_dim,
        cfg.n_kv_heads,
        ih,
        id,
        topk,
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
