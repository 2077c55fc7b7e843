//! Long-context timing of a DSA model, dense vs sparse attention, or of a DeepSeek-V4 model
//! (its own attention only) (`mnemo bench long-context`).
//!
//! For each context length `L` (ascending) the model prefills `L` random tokens into a sparse
//! cache (indexer keys in f32 or 8 bits), then decodes `decode` tokens greedily; the same cache
//! is then switched to dense attention and decodes `decode` more tokens: a dense decode step
//! reads the same `L` cached K/V rows, which is all its cost depends on (the values in the
//! cache do not change the time). Dense prefill is timed separately from an empty dense cache
//! for `L ≤ dense_prefill_max` (it is quadratic: ~4× per doubling).

use crate::generate::{CacheOptions, KvCache};
use crate::model::Model;
use crate::rng::Rng;
use anyhow::{bail, Result};
use serde::Serialize;
use std::time::Instant;

/// One measured context length.
#[derive(Clone, Debug, Serialize)]
pub struct LongContextRow {
    pub context: usize,
    pub sparse_prefill_s: f64,
    pub sparse_decode_ms: f64,
    /// `None` for DeepSeek-V4 models (no dense mode).
    pub dense_decode_ms: Option<f64>,
    /// `None` when the dense prefill was not run (beyond `dense_prefill_max`).
    pub dense_prefill_s: Option<f64>,
    pub kv_bytes: usize,
    pub index_key_bytes: usize,
    /// Peak resident memory of the process so far (`VmHWM`), bytes.
    pub peak_rss_bytes: Option<u64>,
}

/// Settings of [`long_context`].
#[derive(Clone, Debug)]
pub struct LongContextBench {
    pub contexts: Vec<usize>,
    pub decode: usize,
    pub index_keys_8bit: bool,
    pub dense_prefill_max: usize,
    /// Fill the sparse cache with a window-local prefill (see `CacheOptions::window_prefill`).
    pub window_prefill: bool,
    pub seed: u64,
}

/// Peak resident set size of this process, from `/proc/self/status` (Linux).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Prefill `tokens` in slices, reporting progress through `progress(done, total)`.
fn prefill(
    model: &Model,
    tokens: &[u32],
    cache: &mut KvCache,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f32>> {
    let mut last = Vec::new();
    let slice = 8192;
    for (i, part) in tokens.chunks(slice).enumerate() {
        last = model.forward_cached(part, cache)?;
        progress((i * slice + part.len()).min(tokens.len()), tokens.len());
    }
    Ok(last)
}

fn decode(model: &Model, first: &[f32], n: usize, cache: &mut KvCache) -> Result<f64> {
    let mut logits = first.to_vec();
    let greedy = crate::generate::Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
    let mut rng = Rng::new(0);
    let t0 = Instant::now();
    for _ in 0..n {
        let tok = crate::generate::sample(&logits, logits.len(), greedy, &mut rng);
        logits = model.forward_cached(&[tok], cache)?;
    }
    Ok(t0.elapsed().as_secs_f64() * 1e3 / n.max(1) as f64)
}

/// Run the benchmark on `model` (a DSA model whose `max_seq_len` covers the longest context
/// plus `2·decode`), calling `on_row` after each context length.
pub fn long_context(
    model: &Model,
    b: &LongContextBench,
    progress: &mut dyn FnMut(&str, usize, usize),
    on_row: &mut dyn FnMut(&LongContextRow),
) -> Result<Vec<LongContextRow>> {
    let c = &model.cfg;
    if c.dsa.is_none() && c.v4.is_none() {
        bail!("long-context benchmark: the model has no DSA config (use a *-dsa or v4-* preset)");
    }
    let v4 = c.v4.is_some();
    let need = b.contexts.iter().copied().max().unwrap_or(0) + 2 * b.decode + 1;
    if need > c.max_seq_len {
        bail!(
            "long-context benchmark: contexts up to {need} tokens need max_seq_len ≥ {need} (it is {})",
            c.max_seq_len
        );
    }
    let mut rng = Rng::new(b.seed);
    let mut rows = Vec::new();
    for &l in &b.contexts {
        if l == 0 {
            bail!("long-context benchmark: a context length must be > 0");
        }
        let toks: Vec<u32> = (0..l)
            .map(|_| rng.below(c.vocab_size as u64) as u32)
            .collect();
        let opts = CacheOptions {
            index_keys_8bit: b.index_keys_8bit,
            dense_attention: false,
            window_prefill: b.window_prefill,
        };
        let mut cache = KvCache::with_options(model, need, opts);
        let t0 = Instant::now();
        let last = prefill(model, &toks, &mut cache, &mut |d, t| {
            progress(&format!("sparse prefill {l}"), d, t)
        })?;
        let sparse_prefill_s = t0.elapsed().as_secs_f64();
        let sparse_decode_ms = decode(model, &last, b.decode, &mut cache)?;
        let (kv_bytes, index_key_bytes) = (cache.kv_bytes(), cache.index_key_bytes());
        let dense_decode_ms = match v4 {
            true => None,
            false => {
                cache.use_dense_attention();
                Some(decode(model, &last, b.decode, &mut cache)?)
            }
        };
        drop(cache);
        let dense_prefill_s = if l <= b.dense_prefill_max && !v4 {
            let opts = CacheOptions {
                dense_attention: true,
                window_prefill: false,
                ..opts
            };
            let mut cache = KvCache::with_options(model, need, opts);
            let t0 = Instant::now();
            prefill(model, &toks, &mut cache, &mut |d, t| {
                progress(&format!("dense prefill {l}"), d, t)
            })?;
            Some(t0.elapsed().as_secs_f64())
        } else {
            None
        };
        let row = LongContextRow {
            context: l,
            sparse_prefill_s,
            sparse_decode_ms,
            dense_decode_ms,
            dense_prefill_s,
            kv_bytes,
            index_key_bytes,
            peak_rss_bytes: peak_rss(),
        };
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}
