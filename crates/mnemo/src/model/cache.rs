//! The decode state of one sequence: per-layer keys and values, the DSA indexer's keys, and
//! the Engram decode state. The cached driver ([`super::decode`]) appends to it; saving and
//! loading a prefix cache is in [`crate::generate`].
//!
//! ```text
//! k[l], v[l]: [rows ≥ len, KV·d_h]     ik[l]: indexer keys [len, d_I] (DSA, sparse attention)
//! v4[l]: DeepSeek-V4 models: window ring, compressed entries, indexer keys (instead of k, v)
//! k[l]: MLA models (`cfg.mla`): [rows, r + d_r], the latent and the RoPE key; v[l] empty
//! ```

use super::attention_v4_cache::{self as v4c, V4LayerCache};
use super::Model;
use crate::kernels::indexer::KeyStore;
use anyhow::{bail, Result};

/// Per-layer key/value cache of one sequence. Its buffers grow with the context (doubling, up
/// to `cap` positions), so a model with a long `max_seq_len` costs memory only for the
/// positions in use.
pub struct KvCache {
    /// Per layer `[rows, KV·d_h]`, `rows ≥ len` (grown by [`KvCache::reserve`]).
    pub(crate) k: Vec<Vec<f32>>,
    pub(crate) v: Vec<Vec<f32>>,
    /// Row width `KV·d_h` (MLA: `r + d_r`, [`super::attention_mla`]).
    pub(crate) w: usize,
    /// Row width of `v` (`w`; 0 for MLA, whose values are the latent in `k`).
    pub(crate) wv: usize,
    /// DSA models: per layer the lightning indexer's keys (empty otherwise, or with dense
    /// attention).
    pub(crate) ik: Vec<KeyStore>,
    /// DSA models: attend densely (no indexer), e.g. to compare with the sparse path.
    pub(crate) dense: bool,
    /// See [`CacheOptions::window_prefill`].
    pub(crate) window_prefill: bool,
    pub(crate) len: usize,
    pub(crate) cap: usize,
    /// Engram decode state (token history and each gate's convolution history).
    pub engram: Option<crate::engram::EngramState>,
    /// DeepSeek-V4 models: each layer's window, compressed entries and indexer keys
    /// (module [`super::attention_v4_cache`]); `k` and `v` are then empty.
    pub(crate) v4: Vec<V4LayerCache>,
}

impl KvCache {
    pub fn new(model: &Model) -> Self {
        Self::with_capacity(model, model.cfg.max_seq_len)
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

/// Run-time attention options of a cache (DSA models).
#[derive(Clone, Copy, Debug, Default)]
pub struct CacheOptions {
    /// Store the lightning indexer's keys in 8 bits (one f32 scale per key) instead of f32.
    pub index_keys_8bit: bool,
    /// Attend densely instead of over the indexer's top-k (DSA models; for comparisons).
    pub dense_attention: bool,
    /// Benchmarks only (DSA models): prefill chunks (more than one new token) attend to their
    /// last `index_topk` positions instead of the indexer's top-k, skipping the indexer's
    /// `O(L²)` scan; the indexer keys are still cached and decoding is exact DSA. DeepSeek-V4
    /// models: prefill chunks read their last `index_topk` compressed entries on CSA and HCA
    /// layers (instead of the indexer's top-k, and of all entries); the window, entries and
    /// indexer keys are cached as always and decoding is exact. This is NOT
    /// the model's computation: it fills a long cache quickly to time decoding at a context
    /// length whose exact prefill would take hours.
    pub window_prefill: bool,
}

/// Tokens processed per prefill chunk.
pub const PREFILL_CHUNK: usize = 256;

/// Helpers for the batched forward (`batch.rs`), lookup decoding and the server's prefix cache.
impl KvCache {
    /// A cache holding at most `cap` positions (≤ the model's `max_seq_len`): a server can give
    /// each sequence a smaller window than the model supports.
    pub fn with_capacity(model: &Model, cap: usize) -> Self {
        Self::with_options(model, cap, CacheOptions::default())
    }

    /// A cache of at most `cap` positions with the given attention options.
    pub fn with_options(model: &Model, cap: usize, opts: CacheOptions) -> Self {
        let c = &model.cfg;
        let cap = cap.min(c.max_seq_len);
        let ik = match (&c.dsa, opts.dense_attention) {
            (Some(dc), false) => (0..c.n_layers)
                .map(|_| KeyStore::new(dc.index_head_dim, 0, opts.index_keys_8bit))
                .collect(),
            _ => Vec::new(),
        };
        // DeepSeek-V4 layers keep their own state instead of per-position K/V rows.
        let kv_layers = if c.v4.is_some() { 0 } else { c.n_layers };
        let (w, wv) = match &c.mla {
            Some(m) => (super::attention_mla::MlaDims::of(c, m).cache_width(), 0),
            None => (c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim),
        };
        KvCache {
            k: vec![Vec::new(); kv_layers],
            v: vec![Vec::new(); kv_layers],
            w,
            wv,
            ik,
            dense: opts.dense_attention,
            window_prefill: opts.window_prefill,
            len: 0,
            cap,
            engram: model.engram.as_ref().map(|e| e.new_state()),
            v4: model.v4_layer_caches(),
        }
    }

    /// Make room for `need ≤ cap` positions (buffers at least double when they grow).
    pub(crate) fn reserve(&mut self, need: usize) {
        let w = self.w;
        let rows = self.k.first().map_or(0, |k| k.len() / w.max(1));
        if need <= rows {
            return;
        }
        let rows = need.max(2 * rows).max(64).min(self.cap.max(need));
        for l in 0..self.k.len() {
            self.k[l].resize(rows * w, 0.0);
            self.v[l].resize(rows * self.wv, 0.0);
        }
        for ik in &mut self.ik {
            ik.reserve(rows);
        }
    }

    /// Bytes of K/V rows in use (`len` positions, f32); DeepSeek-V4 models: the window rows
    /// and compressed entries the next token attends to.
    pub fn kv_bytes(&self) -> usize {
        self.k.len() * self.len * (self.w + self.wv) * 4 + v4c::bytes_all(&self.v4, self.len).0
    }

    /// Attend densely from now on (DSA models): the indexer keys are dropped, so the cache
    /// cannot go back to sparse attention.
    pub fn use_dense_attention(&mut self) {
        self.dense = true;
        self.ik.clear();
    }

    /// Bytes of the DSA indexer keys in use (0 without DSA or with dense attention;
    /// DeepSeek-V4 models: the CSA indexer's compressed keys).
    pub fn index_key_bytes(&self) -> usize {
        self.ik.iter().map(|k| k.bytes_used()).sum::<usize>() + v4c::bytes_all(&self.v4, self.len).1
    }

    /// Forget every position from `len` on (e.g. rejected draft tokens). The Engram decode
    /// state is not rewound: lookup decoding refuses Engram models. A DeepSeek-V4 cache can
    /// go back at most [`v4c::V4_ROLLBACK`] positions (an error beyond, the cache unchanged).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let len = self.len.min(len);
        v4c::truncate_all(&mut self.v4, len)?;
        self.len = len;
        for ik in &mut self.ik {
            ik.truncate(self.len);
        }
        Ok(())
    }

    /// Copy the first `n` positions of `src` into this cache (replacing what it held).
    pub fn copy_prefix_from(&mut self, src: &KvCache, n: usize) -> Result<()> {
        if src.engram.is_some() {
            bail!("prefix caching is not supported for Engram models yet");
        }
        if n > src.len
            || n > self.cap
            || self.k.len() != src.k.len()
            || self.v4.len() != src.v4.len()
        {
            bail!(
                "cannot copy {n} cached positions (source holds {}, room {})",
                src.len,
                self.cap
            );
        }
        let (w, wv) = (src.w, src.wv);
        self.reserve(n);
        if self.ik.len() != src.ik.len() || self.dense != src.dense {
            bail!("cannot copy a prefix between caches with different attention options");
        }
        for l in 0..self.k.len() {
            self.k[l][..n * w].copy_from_slice(&src.k[l][..n * w]);
            self.v[l][..n * wv].copy_from_slice(&src.v[l][..n * wv]);
        }
        for (dst, s) in self.ik.iter_mut().zip(&src.ik) {
            let mut c = s.clone();
            c.truncate(n);
            *dst = c;
        }
        if !src.v4.is_empty() {
            let mut v4 = src.v4.clone();
            v4c::truncate_all(&mut v4, n)?;
            self.v4 = v4;
        }
        self.len = n;
        Ok(())
    }

    /// Layer `l`'s K and V rows (`[cap, KV·d_h]` each), for the batched forward.
    pub(crate) fn layer_mut(&mut self, l: usize) -> (&mut [f32], &mut [f32]) {
        (&mut self.k[l], &mut self.v[l])
    }

    /// Layer `l`'s keys and values of positions `0..len`, and (DSA models attending sparsely)
    /// its indexer-key store with whether prefill attends to a window instead
    /// ([`CacheOptions::window_prefill`]).
    #[allow(clippy::type_complexity)]
    pub(crate) fn attention_parts(
        &mut self,
        l: usize,
        len: usize,
    ) -> (&[f32], &[f32], Option<(&mut KeyStore, bool)>) {
        let (w, wv) = (self.w, self.wv);
        let ik = match (self.dense, self.ik.get_mut(l)) {
            (false, Some(keys)) => Some((keys, self.window_prefill)),
            _ => None,
        };
        (&self.k[l][..len * w], &self.v[l][..len * wv], ik)
    }

    /// **Benchmark only**: make this (empty) DeepSeek-V4 cache hold `len` positions of random
    /// state of exactly the sizes a prefill of `len` tokens leaves (window rows, compressor
    /// tails, compressed attention entries and indexer keys; normal values), so decoding and
    /// prefill at a long context can be timed without prefilling it (`mnemo v4-scale`). The
    /// logits that follow are meaningless; their cost is the real one.
    pub fn fill_synthetic(&mut self, len: usize, seed: u64) -> Result<()> {
        if self.v4.is_empty() || self.len != 0 {
            bail!("fill_synthetic: only an empty DeepSeek-V4 cache");
        }
        if len > self.cap {
            bail!(
                "fill_synthetic: {len} positions exceed the cache's capacity {}",
                self.cap
            );
        }
        let mut rng = crate::rng::Rng::derived(seed, "synthetic-cache");
        for (l, c) in self.v4.iter_mut().enumerate() {
            c.fill_random(len, &mut rng)
                .map_err(|e| anyhow::anyhow!("layer {l}: {e:#}"))?;
        }
        self.len = len;
        Ok(())
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.cap);
        self.len = len;
    }
}
