//! Prefix caches (`mnemo ask`, the server): the K/V rows (and DSA indexer keys) of a cached
//! prompt prefix and its tokens, saved as safetensors tagged with the [`model_fingerprint`] of
//! the model that computed them: `KvCache::save` / `KvCache::load`.

use super::safetensors::{serialize_mixed, Data, TensorFile};
use crate::model::{KvCache, Model};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// A fingerprint of a model's config and weights (FNV-1a over the config JSON and the raw
/// parameter bits): a saved prefix cache is only valid for the exact model that computed it.
pub fn model_fingerprint(model: &Model) -> u64 {
    let mut h = crate::util::fnv1a64(
        serde_json::to_string(&model.cfg)
            .unwrap_or_default()
            .as_bytes(),
    );
    for chunk in model.params.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
        h = h.rotate_left(5) ^ crate::util::fnv1a64(&bytes);
    }
    h
}

/// The prefix-cache file format (methods here, beside the format, rather than in
/// `crate::model`, which imports no file format).
impl KvCache {
    /// Save the cached prefix (its tokens and per-layer K/V rows) to `path`, atomically, tagged
    /// with the model's fingerprint.
    pub fn save(&self, path: &Path, model: &Model, tokens: &[u32]) -> Result<()> {
        if self.engram.is_some() {
            bail!("prefix caches of Engram models are not supported (the Engram decode state is not saved)");
        }
        if tokens.len() != self.len {
            bail!(
                "prefix cache: {} tokens given for {} cached positions",
                tokens.len(),
                self.len
            );
        }
        let c = &model.cfg;
        // Row widths of `k` and `v` (MLA: the latent and RoPE key in `k`, `v` empty).
        let (w, wv) = (self.w, self.wv);
        let mut t: Vec<(String, Vec<usize>, Data)> = Vec::new();
        let mut meta = std::collections::HashMap::new();
        // DeepSeek-V4: each layer's window rows, compressor tails and entries (`k`, `v` unused;
        // MTP blocks keep no state here: decoding does not run them).
        for (l, lc) in self.v4.iter().enumerate().take(c.n_layers) {
            for p in lc.parts() {
                let name = format!("v4.{l}.{}", p.name);
                meta.insert(format!("{name}.base"), p.base.to_string());
                t.push((
                    name,
                    vec![p.data.len() / p.width, p.width],
                    Data::F32(p.data),
                ));
            }
        }
        for l in (0..c.n_layers).filter(|_| self.v4.is_empty()) {
            t.push((
                format!("k.{l}"),
                vec![self.len, w],
                Data::F32(&self.k[l][..self.len * w]),
            ));
            t.push((
                format!("v.{l}"),
                vec![self.len, wv],
                Data::F32(&self.v[l][..self.len * wv]),
            ));
        }
        let ik: Vec<Vec<f32>> = self
            .ik
            .iter()
            .map(|st| (0..self.len).flat_map(|s| st.key(s)).collect())
            .collect();
        for (l, keys) in ik.iter().enumerate() {
            t.push((
                format!("ik.{l}"),
                vec![self.len, keys.len() / self.len.max(1)],
                Data::F32(keys),
            ));
        }
        t.push((
            "tokens".into(),
            vec![self.len],
            Data::I32(tokens.iter().map(|&x| x as i32).collect()),
        ));
        meta.insert(
            "mnemo_prefix_cache".into(),
            format!("{:016x}", model_fingerprint(model)),
        );
        let bytes = serialize_mixed(&t, meta)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        crate::util::write_atomic(path, &bytes)
    }

    /// Load a prefix cache saved by [`KvCache::save`] for this exact model; returns the cache
    /// and its tokens. A cache of another model (or a corrupt file) is an error naming it.
    pub fn load(path: &Path, model: &Model) -> Result<(KvCache, Vec<u32>)> {
        let f = TensorFile::open(path)?;
        let want = format!("{:016x}", model_fingerprint(model));
        let meta = f.metadata()?;
        match meta.get("mnemo_prefix_cache") {
            Some(got) if *got == want => {}
            _ => bail!(
                "{} is a prefix cache of another model (or not one at all)",
                path.display()
            ),
        }
        let tokens = f.u32("tokens")?;
        let mut cache = KvCache::new(model);
        if tokens.len() > cache.cap {
            bail!(
                "{}: {} cached tokens exceed max_seq_len {}",
                path.display(),
                tokens.len(),
                cache.cap
            );
        }
        let c = &model.cfg;
        let (w, wv) = (cache.w, cache.wv);
        let n = tokens.len();
        for (l, lc) in cache.v4.iter_mut().enumerate().take(c.n_layers) {
            lc.restore(n, |part, width| {
                let name = format!("v4.{l}.{part}");
                let Some(base) = meta.get(&format!("{name}.base")) else {
                    return Ok(None);
                };
                let base: usize = base
                    .parse()
                    .with_context(|| format!("`{name}.base` is not a position: {base:?}"))?;
                let rows = f
                    .raw(&name)
                    .map_or(0, |r| r.shape.first().copied().unwrap_or(0));
                Ok(Some((base, f.f32(&name, Some(&[rows, width]))?)))
            })
            .with_context(|| format!("{}: DeepSeek-V4 layer {l}'s cached state", path.display()))?;
        }
        cache.reserve(tokens.len());
        for l in (0..c.n_layers).filter(|_| cache.v4.is_empty()) {
            let k = f.f32(&format!("k.{l}"), Some(&[tokens.len(), w]))?;
            let v = f.f32(&format!("v.{l}"), Some(&[tokens.len(), wv]))?;
            cache.k[l][..k.len()].copy_from_slice(&k);
            cache.v[l][..v.len()].copy_from_slice(&v);
        }
        if let Some(dc) = &c.dsa {
            for (l, st) in cache.ik.iter_mut().enumerate() {
                let keys = f
                    .f32(&format!("ik.{l}"), Some(&[tokens.len(), dc.index_head_dim]))
                    .with_context(|| {
                        format!(
                            "{}: no indexer keys for layer {l} (saved with dense attention?)",
                            path.display()
                        )
                    })?;
                st.push(&keys);
            }
        }
        cache.len = tokens.len();
        Ok((cache, tokens))
    }
}
