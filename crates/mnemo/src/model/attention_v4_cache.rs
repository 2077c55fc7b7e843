//! Cached decoding of the DeepSeek-V4 attention (`docs/deepseek-v4-equations.md` §6): what one
//! layer keeps per sequence, and the cached driver's path through [`super::attention_v4`].
//!
//! ```text
//! window:  the K = V rows of the last W positions              [≤ W + R, d]
//! entries: compressed entries, one more every m tokens         [⌊len/m⌋, d]
//! tail:    compressor projections not yet pooled (values, logits)  [≤ 2m + R, cw] each
//! index:   CSA: the indexer's compressed keys and its own tail  [⌊len/m⌋, dᴵ]
//! ```
//!
//! A query at position `t` attends to the window rows `t − W < s ≤ t` and the entries
//! `w < ⌊(t+1)/m⌋` (CSA: the indexer's top-k of them): the rows the full forward gives it, so
//! prefill + one-token decoding reproduces the full forward's logits (up to f32 rounding of
//! products over different row counts). An entry is pooled, normed and roped once, when its
//! last token arrives. Per token the state grows by `d/m` (+ `dᴵ/m` on CSA layers) floats;
//! the window and the tail are bounded. `R` ([`V4_ROLLBACK`]) positions of slack let a cache
//! forget rejected draft tokens ([`super::KvCache::truncate`]).

use super::attention::Span;
use super::attention_v4::{pool_entry, CompressorOffsets, V4Acts, V4AttnOffsets, V4Rope};
use super::Model;
use anyhow::{bail, Result};
use rayon::prelude::*;

/// Positions a DeepSeek-V4 cache can be rolled back by (rejected draft tokens).
pub const V4_ROLLBACK: usize = 64;

/// Rows of consecutive positions `base..end` (`width` floats each); old rows are forgotten as
/// the sequence moves on.
#[derive(Clone, Debug, Default)]
pub(crate) struct PosRows {
    base: usize,
    width: usize,
    data: Vec<f32>,
}

impl PosRows {
    fn new(width: usize) -> Self {
        PosRows {
            base: 0,
            width,
            data: Vec::new(),
        }
    }

    fn end(&self) -> usize {
        self.base + self.data.len() / self.width
    }

    fn push(&mut self, rows: &[f32]) {
        self.data.extend_from_slice(rows);
    }

    /// The rows of positions `from..end`.
    fn rows(&self, from: usize) -> &[f32] {
        &self.data[(from - self.base) * self.width..]
    }

    /// Forget the rows before position `p` (in batches, so forgetting costs O(1) per row).
    fn forget_before(&mut self, p: usize) {
        let drop = p.min(self.end()).saturating_sub(self.base);
        if drop > 0 && 2 * drop * self.width >= self.data.len() {
            self.data.drain(..drop * self.width);
            self.base += drop;
        }
    }

    /// Rows in use from position `from` on, in bytes (f32).
    fn bytes_from(&self, from: usize) -> usize {
        (self.end().saturating_sub(from.max(self.base))) * self.width * 4
    }
}

/// A compressor's decode state: the projections of the positions its next entries pool, and
/// the entries so far.
#[derive(Clone, Debug)]
pub(crate) struct CompCache {
    ckv: PosRows,
    cg: PosRows,
    entries: Vec<f32>,
    dim: usize,
    ratio: usize,
    overlap: bool,
}

impl CompCache {
    fn new(co: &CompressorOffsets) -> Self {
        CompCache {
            ckv: PosRows::new(co.width()),
            cg: PosRows::new(co.width()),
            entries: Vec::new(),
            dim: co.dim,
            ratio: co.ratio,
            overlap: co.overlap,
        }
    }

    fn n(&self) -> usize {
        self.entries.len() / self.dim
    }

    /// The first position entry `w`'s pooling reads (CSA: the window before it).
    fn first_pos(&self, w: usize) -> usize {
        match self.overlap {
            true => w.saturating_sub(1) * self.ratio,
            false => w * self.ratio,
        }
    }
}

/// One DeepSeek-V4 attention layer's decode state for one sequence (module docs).
#[derive(Clone, Debug)]
pub(crate) struct V4LayerCache {
    window: PosRows,
    sliding_window: usize,
    comp: Option<CompCache>,
    index: Option<CompCache>,
}

impl V4LayerCache {
    /// Can this state forget every position from `len` on?
    fn can_truncate(&self, len: usize) -> bool {
        let w_ok = self.window.base <= (len + 1).saturating_sub(self.sliding_window);
        let c_ok = |c: &CompCache| c.ckv.base <= c.first_pos(len / c.ratio);
        w_ok && self.comp.as_ref().is_none_or(c_ok) && self.index.as_ref().is_none_or(c_ok)
    }

    fn truncate(&mut self, len: usize) {
        let w = self.window.width;
        self.window
            .data
            .truncate(len.saturating_sub(self.window.base) * w);
        for c in self.comp.iter_mut().chain(self.index.iter_mut()) {
            let n = (len / c.ratio).min(c.n());
            c.entries.truncate(n * c.dim);
            let cw = c.ckv.width;
            c.ckv.data.truncate(len.saturating_sub(c.ckv.base) * cw);
            c.cg.data.truncate(len.saturating_sub(c.cg.base) * cw);
        }
    }

    /// Bytes the architecture needs at `len` positions: the window's rows and the entries
    /// (attention and, CSA, the indexer's keys: `(attention, indexer)`).
    fn bytes(&self, len: usize) -> (usize, usize) {
        let win = self
            .window
            .bytes_from((len + 1).saturating_sub(self.sliding_window));
        let ent = |c: &Option<CompCache>| c.as_ref().map_or(0, |c| c.entries.len() * 4);
        (win + ent(&self.comp), ent(&self.index))
    }
}

/// One piece of a layer's decode state as prefix-cache files keep it: `data` holds rows of
/// `width` floats, the first of them for position (window, tails) or entry (entries) `base`.
pub(crate) struct V4Part<'a> {
    pub name: &'static str,
    pub base: usize,
    pub width: usize,
    pub data: &'a [f32],
}

/// The names of a layer's state pieces, in [`V4LayerCache::parts`] order.
const PART_NAMES: [&str; 7] = [
    "window",
    "comp.kv",
    "comp.gate",
    "comp.entries",
    "index.kv",
    "index.gate",
    "index.entries",
];

impl V4LayerCache {
    /// The pieces of this state (a layer without a compressor or indexer has fewer).
    pub(crate) fn parts(&self) -> Vec<V4Part<'_>> {
        fn rows<'a>(name: &'static str, r: &'a PosRows) -> V4Part<'a> {
            V4Part {
                name,
                base: r.base,
                width: r.width,
                data: &r.data,
            }
        }
        let mut out = vec![rows(PART_NAMES[0], &self.window)];
        for (c, names) in [
            (&self.comp, &PART_NAMES[1..4]),
            (&self.index, &PART_NAMES[4..7]),
        ] {
            if let Some(c) = c {
                out.push(rows(names[0], &c.ckv));
                out.push(rows(names[1], &c.cg));
                out.push(V4Part {
                    name: names[2],
                    base: 0,
                    width: c.dim,
                    data: &c.entries,
                });
            }
        }
        out
    }

    /// Restore the state of `len` positions from its pieces (`get(name)` gives a piece's base
    /// and rows, or `None` where the file lacks it), checking that they fit this layer and
    /// `len`; the error says which piece is wrong.
    pub(crate) fn restore(
        &mut self,
        len: usize,
        mut get: impl FnMut(&str, usize) -> Result<Option<(usize, Vec<f32>)>>,
    ) -> Result<()> {
        type Get<'g> = dyn FnMut(&str, usize) -> Result<Option<(usize, Vec<f32>)>> + 'g;
        fn rows(get: &mut Get<'_>, name: &str, r: &mut PosRows, len: usize) -> Result<()> {
            let (base, data) = get(name, r.width)?
                .ok_or_else(|| anyhow::anyhow!("its `{name}` rows are missing"))?;
            if data.len() % r.width != 0 || base + data.len() / r.width != len {
                bail!(
                    "its `{name}` rows ({} floats from position {base}) do not end at position {len}",
                    data.len()
                );
            }
            r.base = base;
            r.data = data;
            Ok(())
        }
        let get: &mut Get<'_> = &mut get;
        rows(get, "window", &mut self.window, len)?;
        if self.window.base > (len + 1).saturating_sub(self.sliding_window) {
            bail!(
                "its window starts after position {}",
                (len + 1).saturating_sub(self.sliding_window)
            );
        }
        for (c, names) in [
            (self.comp.as_mut(), &PART_NAMES[1..4]),
            (self.index.as_mut(), &PART_NAMES[4..7]),
        ] {
            let Some(c) = c else { continue };
            rows(get, names[0], &mut c.ckv, len)?;
            rows(get, names[1], &mut c.cg, len)?;
            let (base, e) = get(names[2], c.dim)?
                .ok_or_else(|| anyhow::anyhow!("its `{}` are missing", names[2]))?;
            if base != 0 || e.len() != (len / c.ratio) * c.dim {
                bail!(
                    "its `{}` hold {} floats, expected {} entries of {}",
                    names[2],
                    e.len(),
                    len / c.ratio,
                    c.dim
                );
            }
            c.entries = e;
            if c.ckv.base != c.cg.base || c.ckv.base > c.first_pos(len / c.ratio) {
                bail!("its `{}` rows start too late for the next entry", names[0]);
            }
        }
        Ok(())
    }
}

impl V4LayerCache {
    /// Benchmark only ([`super::KvCache::fill_synthetic`]): the state of `len` positions with
    /// random rows (normal, std 1) of exactly the sizes `len` prefilled tokens leave: the
    /// window, the compressor tails and the compressed entries (attention and indexer).
    pub(crate) fn fill_random(&mut self, len: usize, rng: &mut crate::rng::Rng) -> Result<()> {
        let w0 = (len + 1).saturating_sub(self.sliding_window);
        let ratio = |c: &Option<CompCache>| c.as_ref().map_or(1, |c| c.ratio);
        let (rc, ri) = (ratio(&self.comp), ratio(&self.index));
        self.restore(len, |name, width| {
            let r = if name.starts_with("index") { ri } else { rc };
            let (base, n) = match name {
                "window" => (w0, len - w0),
                "comp.entries" | "index.entries" => (0, len / r),
                _ => {
                    let b = (len / r).saturating_sub(1) * r;
                    (b, len - b)
                }
            };
            let mut v = vec![0.0f32; n * width];
            rng.fill_normal(&mut v, 1.0);
            Ok(Some((base, v)))
        })
    }
}

/// Roll back the DeepSeek-V4 states of a cache to `len` positions (all layers or none).
pub(crate) fn truncate_all(layers: &mut [V4LayerCache], len: usize) -> Result<()> {
    if let Some(l) = layers.iter().position(|c| !c.can_truncate(len)) {
        bail!(
            "cannot roll a DeepSeek-V4 cache back to {len} positions: layer {l} keeps only the \
             last {V4_ROLLBACK} positions beyond its window and entries"
        );
    }
    layers.iter_mut().for_each(|c| c.truncate(len));
    Ok(())
}

/// Bytes of all layers' states at `len` positions: `(window rows + entries, indexer keys)`.
pub(crate) fn bytes_all(layers: &[V4LayerCache], len: usize) -> (usize, usize) {
    layers.iter().fold((0, 0), |(a, b), c| {
        let (x, y) = c.bytes(len);
        (a + x, b + y)
    })
}

impl Model {
    /// Empty per-layer decode states of a DeepSeek-V4 model (none for other models).
    pub(crate) fn v4_layer_caches(&self) -> Vec<V4LayerCache> {
        let Some(v) = &self.cfg.v4 else {
            return Vec::new();
        };
        self.layout
            .layers
            .iter()
            .filter_map(|lo| lo.v4.as_ref())
            .map(|vo| V4LayerCache {
                window: PosRows::new(self.cfg.head_dim),
                sliding_window: v.sliding_window,
                comp: vo.compressor.as_ref().map(CompCache::new),
                index: vo.indexer.as_ref().map(|io| CompCache::new(&io.comp)),
            })
            .collect()
    }

    /// Advance a compressor's state over the rows `x: [n, D]` at positions `p0..p0 + n`: their
    /// projections join the tail, and every entry whose last token is among them is pooled,
    /// normed and roped.
    fn v4_comp_advance(
        &self,
        co: &CompressorOffsets,
        cc: &mut CompCache,
        x: &[f32],
        p0: usize,
        rope: &V4Rope,
    ) {
        let end = p0 + x.len() / self.cfg.d_model;
        let (ckv, cg) = self.v4_comp_project(co, x, p0);
        cc.ckv.push(&ckv);
        cc.cg.push(&cg);
        let (w0, w1) = (cc.n(), end / co.ratio);
        if w1 > w0 {
            let mut e = vec![0.0f32; (w1 - w0) * co.dim];
            for (i, ev) in e.chunks_mut(co.dim).enumerate() {
                let tail = (&cc.ckv.data[..], &cc.cg.data[..]);
                pool_entry(co, w0 + i, tail, cc.ckv.base, ev);
            }
            let (out, _) = self.v4_comp_finish(co, &e, w0, rope);
            cc.entries.extend_from_slice(&out);
        }
        // Keep what the next entries pool, also after a rollback of V4_ROLLBACK positions.
        let keep = cc.first_pos(end.saturating_sub(V4_ROLLBACK) / co.ratio);
        cc.ckv.forget_before(keep);
        cc.cg.forget_before(keep);
    }

    /// One sequence's rows of a cached forward on layer `l` (queries and K = V rows already
    /// projected, normed and roped in `acts`): its compressors advance, the CSA indexer picks
    /// each row's entries, every row attends to its window and entries (into `acts.o`), and its
    /// K = V rows join the window.
    pub(crate) fn v4_attend_cached(
        &self,
        l: usize,
        vo: &V4AttnOffsets,
        rope: &V4Rope,
        a: &[f32],
        sp: &mut Span,
        acts: &mut V4Acts,
    ) {
        let c = &self.cfg;
        let v = c.v4.as_ref().expect("a DeepSeek-V4 config");
        let (dm, h, d, ql) = (c.d_model, c.n_heads, c.head_dim, v.q_lora_rank);
        let (hi, di) = (v.index_n_heads, v.index_head_dim);
        let (r0, ni, p0) = (sp.r0, sp.n, sp.p0);
        // Benchmarks only (`CacheOptions::window_prefill`): prefill chunks read their last
        // `index_topk` entries instead of the indexer's top-k (CSA) or all of them (HCA).
        let shortcut = sp.cache.window_prefill && ni > 1;
        let lc = &mut sp.cache.v4[l];
        let xs = &a[r0 * dm..(r0 + ni) * dm];
        if let (Some(co), Some(cc)) = (&vo.compressor, lc.comp.as_mut()) {
            self.v4_comp_advance(co, cc, xs, p0, rope);
        }
        let last_k = |m: usize| -> Vec<Vec<usize>> {
            let k = v.index_topk;
            (p0..p0 + ni)
                .map(|tq| ((tq + 1) / m).saturating_sub(k)..(tq + 1) / m)
                .map(|r| r.collect())
                .collect()
        };
        let sel: Option<Vec<Vec<usize>>> = match (&vo.indexer, lc.index.as_mut()) {
            (Some(io), Some(ic)) if shortcut => {
                self.v4_comp_advance(&io.comp, ic, xs, p0, rope);
                Some(last_k(io.comp.ratio))
            }
            (None, _) if shortcut => vo.compressor.as_ref().map(|co| last_k(co.ratio)),
            (Some(io), Some(ic)) => {
                self.v4_comp_advance(&io.comp, ic, xs, p0, rope);
                let q_res = &acts.q_res[r0 * ql..(r0 + ni) * ql];
                let (mut qi, wts) = self.v4_index_queries(io, xs, q_res);
                let m = io.comp.ratio;
                let keys = &ic.entries;
                Some(
                    qi.par_chunks_mut(hi * di)
                        .zip(wts.par_chunks(hi))
                        .enumerate()
                        .map(|(i, (q, w))| {
                            let tq = p0 + i;
                            // Ties broken on the row of the entries visible to `tq`, as
                            // transformers' one-token decoding has it, whatever the chunking.
                            let visible = (tq + 1) / m;
                            self.v4_topk(rope, tq, (q, w), keys, (visible, visible))
                        })
                        .collect(),
                )
            }
            _ => None,
        };
        // The window rows before the first query's, then the new rows.
        let lo0 = (p0 + 1).saturating_sub(v.sliding_window);
        let new_kv = &acts.kv[r0 * d..(r0 + ni) * d];
        let mut kvs = lc.window.rows(lo0).to_vec();
        kvs.extend_from_slice(new_kv);
        let entries = lc.comp.as_ref().map_or(&[][..], |c| &c.entries[..]);
        let (q, sel) = (&acts.q, sel.as_ref());
        acts.o[r0 * h * d..(r0 + ni) * h * d]
            .par_chunks_mut(h * d)
            .enumerate()
            .for_each(|(i, orow)| {
                let qrow = &q[(r0 + i) * h * d..(r0 + i + 1) * h * d];
                let s = sel.map(|s| &s[i][..]);
                self.v4_attend_row(vo, rope, p0 + i, qrow, (&kvs, lo0), entries, s, orow);
            });
        lc.window.push(new_kv);
        let keep = (p0 + ni + 1).saturating_sub(v.sliding_window + V4_ROLLBACK);
        lc.window.forget_before(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchSeq;
    use crate::config::ModelConfig;
    use crate::model::{KvCache, Workspace};
    use crate::rng::Rng;

    /// `v4-tiny` with a short window and top-k, so sequences of a few hundred tokens slide the
    /// window, complete many entries and make the indexer select; every vector parameter
    /// (sinks, position biases, norms, hc bases) moved away from its init. With 16 indexer
    /// heads no entry has every head ReLU-zeroed, so no two scores tie at the top-k boundary
    /// (ties are broken per forward as transformers breaks them: `Model::v4_topk`).
    fn model() -> Model {
        model_with_index_heads(16)
    }

    fn model_with_index_heads(hi: usize) -> Model {
        let mut c = ModelConfig::preset("v4-tiny").unwrap();
        c.max_seq_len = 512;
        let v = c.v4.as_mut().unwrap();
        (v.sliding_window, v.index_topk, v.index_n_heads) = (8, 5, hi);
        let mut m = Model::new(c).unwrap();
        m.init(7);
        let mut r = Rng::new(8);
        for t in m.layout.tensors.clone() {
            if t.shape.len() == 1 || t.name.ends_with("ape") {
                for p in &mut m.params[t.range()] {
                    *p += 0.3 * r.normal() as f32;
                }
            }
        }
        m
    }

    fn feed(m: &Model, cache: &mut KvCache, tokens: &[u32]) -> Vec<f32> {
        let mut seq = [BatchSeq {
            tokens,
            cache,
            logits_from: 0,
        }];
        m.forward_batch(&mut seq).unwrap().remove(0)
    }

    #[test]
    fn long_cached_decoding_matches_the_full_forward() {
        let m = model();
        let t = 300;
        let ids: Vec<u32> = (0..t as u32).map(|i| (i * 7919 + 13) % 500).collect();
        let mut ws = Workspace::default();
        m.forward(&ids, 1, t, &mut ws);
        let top = ws.logits.iter().fold(0.0f32, |a, &b| a.max(b.abs()));
        for chunk in [1, 37, 256] {
            let mut cache = KvCache::new(&m);
            let got: Vec<f32> = ids
                .chunks(chunk)
                .flat_map(|c| feed(&m, &mut cache, c))
                .collect();
            let worst = got
                .iter()
                .zip(&ws.logits)
                .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(
                worst <= 1e-4 * top,
                "chunks of {chunk}: {worst} (top {top})"
            );
            // The window and tails stay bounded; entries grow by ⌊t/m⌋.
            let v = m.cfg.v4.as_ref().unwrap();
            for lc in &cache.v4 {
                assert!(
                    lc.window.data.len() / lc.window.width
                        <= 2 * (v.sliding_window + V4_ROLLBACK) + chunk
                );
                for c in lc.comp.iter().chain(&lc.index) {
                    assert_eq!(c.n(), t / c.ratio);
                    assert!(
                        c.ckv.data.len() / c.ckv.width <= 2 * (2 * c.ratio + V4_ROLLBACK) + chunk
                    );
                }
            }
        }
    }

    /// With 4 indexer heads, entries whose every head is ReLU-zeroed score exactly 0 and tie
    /// at the top-k boundary. The cached drivers break such ties on the entries visible to
    /// each query (transformers' one-token decoding), so any chunking of the same tokens
    /// gives the same logits; the full forward breaks them on the whole sequence's row
    /// (transformers' full forward), which here differs: the ties are really there.
    #[test]
    fn tied_scores_do_not_make_cached_decoding_depend_on_the_chunking() {
        let m = model_with_index_heads(4);
        let t = 300;
        let ids: Vec<u32> = (0..t as u32).map(|i| (i * 7919 + 13) % 500).collect();
        let runs: Vec<Vec<f32>> = [1, 37, 256]
            .iter()
            .map(|&chunk| {
                let mut cache = KvCache::new(&m);
                ids.chunks(chunk)
                    .flat_map(|c| feed(&m, &mut cache, c))
                    .collect()
            })
            .collect();
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .fold(0.0f32, |w, (x, y)| w.max((x - y).abs()))
        };
        let top = runs[0].iter().fold(0.0f32, |a, &b| a.max(b.abs()));
        for r in &runs[1..] {
            assert!(diff(&runs[0], r) <= 1e-4 * top);
        }
        let mut ws = Workspace::default();
        m.forward(&ids, 1, t, &mut ws);
        assert!(
            diff(&runs[0], &ws.logits) > 1e-2 * top,
            "no tie changed a selection: the test no longer tests ties"
        );
    }

    /// A prefix-cache file (`KvCache::save` / `KvCache::load`) holds the whole decode state:
    /// decoding on from the loaded cache gives the same logits, bit for bit, as from the cache
    /// that was saved, and the loaded cache rolls back as the original does. A piece that does
    /// not fit is refused by name.
    #[test]
    fn a_saved_prefix_cache_decodes_on_bit_identically() {
        let m = model();
        let ids: Vec<u32> = (0..240u32).map(|i| (i * 131 + 7) % 500).collect();
        let (prefix, rest) = ids.split_at(203);
        let mut cache = KvCache::new(&m);
        for c in prefix.chunks(37) {
            feed(&m, &mut cache, c);
        }
        let dir = std::env::temp_dir().join(format!("mnemo-v4-prefix-{}", std::process::id()));
        let path = dir.join("prefix.safetensors");
        cache.save(&path, &m, prefix).unwrap();
        let (mut loaded, toks) = KvCache::load(&path, &m).unwrap();
        let (mut back, _) = KvCache::load(&path, &m).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(toks, prefix);
        assert_eq!(loaded.len(), prefix.len());
        assert_eq!(loaded.kv_bytes(), cache.kv_bytes());
        for &t in rest {
            assert_eq!(feed(&m, &mut cache, &[t]), feed(&m, &mut loaded, &[t]));
        }
        // Roll the loaded copy back 20 positions (within its slack) and decode again.
        back.truncate(183).unwrap();
        let mut fresh = KvCache::new(&m);
        feed(&m, &mut fresh, &prefix[..183]);
        for &t in &prefix[183..] {
            let (a, b) = (feed(&m, &mut fresh, &[t]), feed(&m, &mut back, &[t]));
            let worst = a
                .iter()
                .zip(&b)
                .fold(0.0f32, |w, (x, y)| w.max((x - y).abs()));
            assert!(worst < 1e-4, "{worst}");
        }
        // A tail that ends before the cached length is refused, naming the piece.
        let mut lc = m.v4_layer_caches().remove(1);
        let err = lc
            .restore(203, |name, width| {
                let n = if name == "comp.kv" { 100 } else { 203 };
                Ok(Some((0, vec![0.0; n * width])))
            })
            .unwrap_err();
        assert!(format!("{err:#}").contains("comp.kv"), "{err:#}");
    }

    #[test]
    fn a_rollback_is_exact_within_its_slack_and_refused_beyond() {
        let m = model();
        let ids: Vec<u32> = (0..200u32).map(|i| (i * 31 + 5) % 500).collect();
        let mut cache = KvCache::new(&m);
        let want = feed(&m, &mut cache, &ids);
        let vocab = m.cfg.vocab_size;
        // Beyond the slack: refused, and the cache still decodes as before.
        let err = cache.truncate(200 - V4_ROLLBACK - 20).unwrap_err();
        assert!(format!("{err}").contains("cannot roll"), "{err}");
        assert_eq!(cache.len(), 200);
        let mut c2 = KvCache::new(&m);
        feed(&m, &mut c2, &ids);
        assert_eq!(feed(&m, &mut cache, &[9]), feed(&m, &mut c2, &[9]));
        // Within it: the same logits as the first pass.
        for back in [1, 13, V4_ROLLBACK] {
            let mut c = KvCache::new(&m);
            feed(&m, &mut c, &ids);
            c.truncate(200 - back).unwrap();
            let again = feed(&m, &mut c, &ids[200 - back..]);
            let ref_rows = &want[(200 - back) * vocab..];
            let worst = again
                .iter()
                .zip(ref_rows)
                .fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(worst < 1e-4, "back {back}: {worst}");
        }
    }
}
