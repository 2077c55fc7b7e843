//! `mnemo v4-scale`: DeepSeek-V4 at V4-Flash's real layer shapes on this machine.
//!
//! - `write DIR`: a random-weight checkpoint in the official layout, packed (FP8 + FP4
//!   experts), with V4-Flash's shapes and fewer layers and experts
//!   (`mnemo::io::v4_random`).
//! - `run DIR`: load it packed and memory-mapped (`io::v4_packed`), then per context length:
//!   prefill rate, decode ms/token, KV-cache bytes per token, bytes read per token and
//!   resident memory, as JSON (`scripts/v4-scale.sh` → `results/v4-scale/`).

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mnemo::generate::KvCache;
use mnemo::memstat::MemStatus;
use mnemo::model::decode::profile;
use mnemo::model::Model;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Subcommand)]
pub enum V4ScaleCmd {
    /// Write a random V4-Flash-shaped checkpoint (official layout, FP8 + FP4 experts).
    Write(WriteArgs),
    /// Measure prefill, decode, KV cache and memory of a checkpoint at several contexts.
    Run(RunArgs),
}

#[derive(Args)]
pub struct WriteArgs {
    /// Output directory (created; written outside the repository: it is GBs).
    dir: PathBuf,
    /// Layers (compress ratios alternate CSA 4, HCA 128).
    #[arg(long, default_value_t = 3)]
    layers: usize,
    /// Routed experts per layer (V4-Flash: 256).
    #[arg(long, default_value_t = 256)]
    experts: usize,
    /// Hash-routed layers at the start (V4-Flash: 3).
    #[arg(long, default_value_t = 1)]
    hash_layers: usize,
    /// Largest shard, GB.
    #[arg(long, default_value_t = 4.0)]
    shard_gb: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
pub struct RunArgs {
    /// An official DeepSeek-V4 directory (e.g. from `mnemo v4-scale write`).
    dir: PathBuf,
    /// Context lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [4096usize, 131072, 1048576])]
    contexts: Vec<usize>,
    /// Contexts up to this are prefilled exactly (every token through the model); longer ones
    /// start from a synthetic cache (`KvCache::fill_synthetic`, benchmark only) and time one
    /// prefill chunk of 256 tokens at that depth.
    #[arg(long, default_value_t = 4096)]
    exact_max: usize,
    /// Decoded tokens timed per context (after one untimed).
    #[arg(long, default_value_t = 8)]
    decode: usize,
    /// JSON output file.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(c: V4ScaleCmd) -> Result<()> {
    match c {
        V4ScaleCmd::Write(a) => {
            let cfg = mnemo::io::v4_random::flash_config(a.layers, a.experts, a.hash_layers);
            let t0 = Instant::now();
            let shard = (a.shard_gb * 1e9) as usize;
            let n = mnemo::io::v4_random::write_random(&a.dir, &cfg, shard, a.seed)?;
            eprintln!(
                "v4-scale write: {:.2} GB of tensors in {} in {:.1} s",
                n as f64 / 1e9,
                a.dir.display(),
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        V4ScaleCmd::Run(a) => measure(a),
    }
}

/// Weight bytes one decoded token reads: every packed matrix but the routed experts and the
/// embedding, `top_k` routed experts per layer (their average size), one embedding row, and
/// the f32 parameters the cached forward multiplies.
fn weight_bytes_per_token(m: &Model) -> (u64, u64) {
    let c = &m.cfg;
    let (mut dense, mut experts) = (0u64, 0u64);
    let mut file_bytes = 0u64;
    let names: std::collections::HashMap<usize, &str> = m
        .layout
        .tensors
        .iter()
        .map(|t| (t.offset, t.name.as_str()))
        .collect();
    for (off, q) in &m.quant {
        let b = (q.data.len() + q.rows * q.cols.div_ceil(q.block)) as u64;
        file_bytes += b;
        if *off == m.layout.embed {
            dense += q.row_bytes() as u64; // a mapped embedding: one row a token
        } else if names.get(off).is_some_and(|n| n.contains(".experts.")) {
            experts += b;
        } else {
            dense += b;
        }
    }
    let f32_read: usize = m
        .layout
        .tensors
        .iter()
        .filter(|t| !m.quant.contains_key(&t.offset) && !t.name.starts_with("tok_embeddings"))
        .map(|t| t.len() * 4)
        .sum::<usize>()
        + c.d_model * 4;
    let routed_per_token = experts * c.top_k as u64 / c.n_routed_experts.max(1) as u64;
    (dense + routed_per_token + f32_read as u64, file_bytes)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn measure(a: RunArgs) -> Result<()> {
    if a.decode == 0 {
        bail!("--decode must be at least 1");
    }
    let t0 = Instant::now();
    let model = mnemo::io::v4_packed::load_dir_packed(&a.dir)?;
    let load_s = t0.elapsed().as_secs_f64();
    let after_load = MemStatus::now();
    let c = &model.cfg;
    let (wbytes, packed_bytes) = weight_bytes_per_token(&model);
    eprintln!(
        "v4-scale: {} loaded in {load_s:.2} s ({} packed matrices, {:.2} GB packed); {}; \
         weights read per decoded token {:.3} GB",
        a.dir.display(),
        model.quant.len(),
        packed_bytes as f64 / 1e9,
        after_load.describe(),
        wbytes as f64 / 1e9
    );
    let mut rng = mnemo::rng::Rng::derived(a.seed, "v4-scale-tokens");
    let mut tok = || rng.below(c.vocab_size as u64) as u32;
    // One token on an empty cache: the pages it touches (RssFile growth) are its weights:
    // the dense ones and only the experts it routes to.
    let first = {
        let mut cache = KvCache::with_capacity(&model, 8);
        let t = Instant::now();
        model.forward_cached(&[tok()], &mut cache)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let m = MemStatus::now();
        let grown = m.rss_file.unwrap_or(0) as i64 - after_load.rss_file.unwrap_or(0) as i64;
        eprintln!(
            "v4-scale: first token (cold) {ms:.0} ms, mapped file pages +{:.3} GB; {}",
            grown as f64 / 1e9,
            m.describe()
        );
        serde_json::json!({"ms": ms, "rss_file_growth_bytes": grown, "rss_bytes": m.rss})
    };
    let mut rows = Vec::new();
    const CHUNK: usize = 256;
    for &n in &a.contexts {
        if n > c.max_seq_len {
            bail!(
                "context {n} exceeds the model's max_seq_len {}",
                c.max_seq_len
            );
        }
        let mut cache = KvCache::with_capacity(&model, n);
        let exact = n <= a.exact_max;
        let end_prefill = n.saturating_sub(a.decode + 1);
        let (prefill_tokens, t_fill);
        if exact {
            prefill_tokens = end_prefill;
            t_fill = 0.0;
        } else {
            let t = Instant::now();
            cache
                .fill_synthetic(end_prefill.saturating_sub(CHUNK), a.seed)
                .context("the synthetic cache")?;
            t_fill = t.elapsed().as_secs_f64();
            prefill_tokens = CHUNK;
        }
        let ids: Vec<u32> = (0..prefill_tokens).map(|_| tok()).collect();
        let t = Instant::now();
        let mut logits = model.forward_cached(&ids, &mut cache)?;
        let prefill_s = t.elapsed().as_secs_f64();
        let mut times = Vec::new();
        profile::enable(true);
        for i in 0..=a.decode {
            let next = (0..logits.len()).fold(0, |b, j| if logits[j] > logits[b] { j } else { b });
            let next = if logits[next].is_finite() {
                next as u32
            } else {
                tok()
            };
            let t = Instant::now();
            logits = model.forward_cached(&[next], &mut cache)?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let (wall, _) = profile::take();
        profile::enable(false);
        let total: u64 = wall[profile::TOTAL].max(1);
        let share = |k: usize| wall[k] as f64 / total as f64;
        let kv = cache.kv_bytes() + cache.index_key_bytes();
        let mem = MemStatus::now();
        let ms = median(&mut times);
        let row = serde_json::json!({
            "context": n,
            "prefill": if exact { "exact" } else { "synthetic cache + one 256-token chunk at this depth" },
            "prefill_tokens_timed": prefill_tokens,
            "prefill_tok_s": prefill_tokens as f64 / prefill_s,
            "synthetic_fill_s": t_fill,
            "decode_ms_per_token": ms,
            "decode_ms_all": times,
            "decode_share_attention": share(profile::ATTN),
            "decode_share_lm_head": share(profile::HEAD),
            "kv_bytes": kv,
            "kv_bytes_per_token": kv as f64 / cache.len() as f64,
            "weight_bytes_read_per_token": wbytes,
            "rss_bytes": mem.rss,
            "peak_rss_bytes": mem.peak_rss,
            "rss_anon_bytes": mem.rss_anon,
            "rss_file_bytes": mem.rss_file,
        });
        eprintln!(
            "v4-scale: context {n}: prefill {:.1} tok/s ({}), decode {ms:.1} ms/token \
             (attention {:.0}%), KV {:.0} B/token; {}",
            prefill_tokens as f64 / prefill_s,
            if exact { "exact" } else { "synthetic cache" },
            100.0 * share(profile::ATTN),
            kv as f64 / cache.len() as f64,
            mem.describe()
        );
        rows.push(row);
    }
    let out = serde_json::json!({
        "model_dir": a.dir.display().to_string(),
        "config": {
            "layers": c.n_layers, "experts": c.n_routed_experts, "top_k": c.top_k,
            "d_model": c.d_model, "vocab": c.vocab_size,
        },
        "load_s": load_s,
        "packed_bytes": packed_bytes,
        "weight_bytes_read_per_token": wbytes,
        "rss_after_load_bytes": after_load.rss,
        "rss_file_after_load_bytes": after_load.rss_file,
        "first_token": first,
        "threads": rayon::current_num_threads(),
        "contexts": rows,
    });
    if let Some(p) = a.out.parent() {
        std::fs::create_dir_all(p).ok();
    }
    std::fs::write(&a.out, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    Ok(())
}
