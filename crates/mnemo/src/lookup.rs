//! Lookup-first decoding: take what is already known from memory, compute only what must be
//! reasoned.
//!
//! At each step an N-gram lookup over everything the sequence holds (prompt, context and the
//! text generated so far) proposes a run of draft tokens: the tokens that followed the most
//! recent earlier occurrence of the last `n` tokens (`n = max_ngram` down to `min_ngram`).
//! The model then runs the pending token and the drafts in one forward pass
//! ([`crate::batch::forward_batch`]) and keeps the longest prefix the model agrees with, plus
//! one token of its own at the first disagreement (or after the last draft), so every pass
//! yields at least one token and often many.
//!
//! - Greedy (`temperature = 0`): a draft is kept iff it is the argmax, so the output is the
//!   plain greedy output, token for token.
//! - Sampling: the standard speculative acceptance rule with a deterministic drafter
//!   (Leviathan et al. 2023; Chen et al. 2023): with the target distribution `p` (after
//!   temperature, top-k, top-p) a draft `x` is kept with probability `p(x)`; on rejection the
//!   token is drawn from `p` with `x` removed, renormalised. Each emitted token is therefore
//!   distributed exactly as `p`.
//! - Lossy (opt-in, `threshold = Some(P)`): when the longest N-gram's empirical continuation
//!   probability in the sequence is `≥ P` (with at least two occurrences), that continuation
//!   is emitted without verification (the model still computes its K/V on the next pass).

use crate::batch::{forward_batch, BatchSeq};
pub use crate::generate::distribution;
use crate::generate::{sample, KvCache, Sampling};
use crate::model::Model;
use crate::rng::Rng;
use anyhow::{bail, Result};

/// Lookup settings.
#[derive(Clone, Copy, Debug)]
pub struct LookupConfig {
    /// Longest N-gram matched.
    pub max_ngram: usize,
    /// Shortest N-gram matched.
    pub min_ngram: usize,
    /// Draft tokens proposed per step at most.
    pub max_draft: usize,
    /// Lossy mode: emit unverified continuations whose empirical probability is `≥ P`.
    pub threshold: Option<f32>,
    /// Adapt the number of drafts to recent acceptance (see [`SeqDecoder`]); `false`: always
    /// up to `max_draft`.
    pub adaptive: bool,
}

impl Default for LookupConfig {
    fn default() -> Self {
        LookupConfig {
            max_ngram: 4,
            min_ngram: 2,
            max_draft: 8,
            threshold: None,
            adaptive: true,
        }
    }
}

/// Counters of one decode.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct LookupStats {
    /// Forward passes after the prefill.
    pub passes: usize,
    /// Draft tokens proposed and verified.
    pub drafted: usize,
    /// Draft tokens the model agreed with.
    pub accepted: usize,
    /// Tokens emitted without verification (lossy mode).
    pub unverified: usize,
}

/// Draft up to `k` tokens continuing `hist`: what followed the most recent earlier occurrence
/// of its last `n` tokens, for the largest `n` in `min..=max` that occurs.
pub fn propose(hist: &[u32], cfg: &LookupConfig, k: usize) -> Vec<u32> {
    let len = hist.len();
    if k == 0 {
        return Vec::new();
    }
    for n in (cfg.min_ngram.max(1)..=cfg.max_ngram).rev() {
        if n >= len {
            continue;
        }
        let key = &hist[len - n..];
        // Most recent j < len - n with hist[j..j+n] == key.
        for j in (0..len - n).rev() {
            if hist[j + n - 1] == key[n - 1] && &hist[j..j + n] == key {
                let end = (j + n + k).min(len);
                return hist[j + n..end].to_vec();
            }
        }
    }
    Vec::new()
}

/// The lossy mode's continuation: the most frequent token after the last `max_ngram` tokens,
/// if it follows at least two occurrences and makes up at least `p` of them.
pub fn confident_next(hist: &[u32], n: usize, p: f32) -> Option<u32> {
    let len = hist.len();
    if n == 0 || n >= len {
        return None;
    }
    let key = &hist[len - n..];
    let mut counts: Vec<(u32, usize)> = Vec::new();
    let mut total = 0usize;
    for j in 0..len - n {
        if &hist[j..j + n] == key {
            let t = hist[j + n];
            total += 1;
            match counts.iter_mut().find(|(x, _)| *x == t) {
                Some(c) => c.1 += 1,
                None => counts.push((t, 1)),
            }
        }
    }
    let &(t, c) = counts.iter().max_by_key(|(_, c)| *c)?;
    (total >= 2 && c as f32 >= p * total as f32).then_some(t)
}

/// Draw from `dist` with the uniform `u ∈ [0, 1)`.
fn draw(dist: &[(u32, f64)], u: f64) -> u32 {
    let mut cum = 0.0;
    for &(t, p) in dist {
        cum += p;
        if u < cum {
            return t;
        }
    }
    dist.last().map(|d| d.0).unwrap_or(0)
}

/// The speculative acceptance rule for a deterministic draft `x` under the target
/// distribution of `logits`: `Ok(x)` (kept, with probability `p(x)`) or `Err(y)` (rejected;
/// `y` drawn from `p` without `x`, renormalised). Greedy keeps `x` iff it is the argmax.
pub fn accept_draft(
    logits: &[f32],
    n_valid: usize,
    s: Sampling,
    x: u32,
    rng: &mut Rng,
) -> std::result::Result<u32, u32> {
    if s.temperature <= 0.0 {
        let t = sample(logits, n_valid, s, rng);
        return if t == x { Ok(x) } else { Err(t) };
    }
    let dist = distribution(logits, n_valid, s);
    let px = dist.iter().find(|d| d.0 == x).map_or(0.0, |d| d.1);
    if px > 0.0 && rng.next_f64() < px {
        return Ok(x);
    }
    let rest: Vec<(u32, f64)> = dist.iter().copied().filter(|d| d.0 != x).collect();
    let z: f64 = rest.iter().map(|d| d.1).sum();
    if rest.is_empty() || z <= 0.0 {
        return Ok(x);
    }
    let u = rng.next_f64() * z;
    Err(draw(&rest, u))
}

/// The decoding state of one sequence, shared by [`generate_lookup`] and the server's engine.
///
/// Adaptive drafting (`LookupConfig::adaptive`): a verification row costs a fraction of a
/// decode step (the weights are read once for all rows), so drafts pay off only while they
/// are likely to be kept. The draft length starts at 2 and doubles (up to `max_draft`) after a
/// pass in which every draft was kept (copying a span), and drops to `kept + 1` after a
/// rejection (an edit point). With no N-gram match there is no draft: the pass is a plain
/// one-row decode step.
///
/// `hist` holds the prompt and every emitted token; the cache holds K/V of `hist[..cached]`.
/// A step: [`SeqDecoder::feed`] gives the tokens to run (the pending ones and the drafts),
/// the caller runs them (logits of rows `feed.len() - 1 - drafts ..`, i.e. from
/// [`SeqDecoder::logits_from`]) and hands them to [`SeqDecoder::step`], which returns the
/// emitted tokens; the caller then truncates the cache to [`SeqDecoder::cached`].
pub struct SeqDecoder {
    pub hist: Vec<u32>,
    cached: usize,
    drafts: Vec<u32>,
    /// Tokens emitted unverified by the last `feed` (lossy mode), returned by the next `step`.
    lossy: Vec<u32>,
    feed_len: usize,
    rng: Rng,
    pub sampling: Sampling,
    pub n_valid: usize,
    pub lookup: Option<LookupConfig>,
    pub stats: LookupStats,
    /// Current draft length (adaptive drafting).
    draft_len: usize,
}

impl SeqDecoder {
    /// A decoder for `prompt`, whose K/V the caller computes (prefill) before [`Self::start`].
    pub fn new(
        prompt: &[u32],
        sampling: Sampling,
        seed: u64,
        n_valid: usize,
        lookup: Option<LookupConfig>,
    ) -> Self {
        SeqDecoder {
            hist: prompt.to_vec(),
            cached: prompt.len(),
            drafts: Vec::new(),
            lossy: Vec::new(),
            feed_len: 0,
            rng: Rng::new(seed),
            sampling,
            n_valid,
            lookup,
            stats: LookupStats::default(),
            draft_len: 2,
        }
    }

    /// The first token, from the prefill's last logits.
    pub fn start(&mut self, logits: &[f32]) -> u32 {
        let t = sample(logits, self.n_valid, self.sampling, &mut self.rng);
        self.hist.push(t);
        t
    }

    /// Positions whose K/V the cache must hold.
    pub fn cached(&self) -> usize {
        self.cached
    }

    /// The tokens to run next: the pending tokens (not yet in the cache) followed by up to
    /// `max_draft` drafts, at most `room` tokens in all (the cache's free positions) and at
    /// most `budget` new tokens proposed (tokens the caller still wants). Empty when there is
    /// no room for the pending token.
    pub fn feed(&mut self, room: usize, budget: usize) -> Vec<u32> {
        self.drafts.clear();
        self.lossy.clear();
        if let Some(cfg) = self.lookup {
            if let Some(p) = cfg.threshold {
                while self.lossy.len() + 1 < budget
                    && self.hist.len() - self.cached + 1 < room
                    && self.lossy.len() < cfg.max_draft
                {
                    match confident_next(&self.hist, cfg.max_ngram, p) {
                        Some(t) => {
                            self.hist.push(t);
                            self.lossy.push(t);
                        }
                        None => break,
                    }
                }
            }
        }
        let pending = self.hist.len() - self.cached;
        if pending > room {
            return Vec::new();
        }
        if let Some(cfg) = self.lookup {
            let want = if cfg.adaptive {
                self.draft_len.min(cfg.max_draft)
            } else {
                cfg.max_draft
            };
            let k = want
                .min(room - pending)
                .min(budget.saturating_sub(self.lossy.len() + 1));
            self.drafts = propose(&self.hist, &cfg, k);
        }
        let mut f = self.hist[self.cached..].to_vec();
        f.extend_from_slice(&self.drafts);
        self.feed_len = f.len();
        f
    }

    /// The first row of the last feed whose logits [`Self::step`] needs.
    pub fn logits_from(&self) -> usize {
        self.feed_len - 1 - self.drafts.len()
    }

    /// Consume the logits of rows `logits_from()..` of the last feed (row-major `[rows, V]`,
    /// `V = logits.len() / rows`); returns the tokens emitted (unverified ones first).
    pub fn step(&mut self, logits: &[f32]) -> Vec<u32> {
        let rows = self.drafts.len() + 1;
        let v = logits.len() / rows;
        let mut out = std::mem::take(&mut self.lossy);
        self.stats.unverified += out.len();
        self.stats.passes += 1;
        self.stats.drafted += self.drafts.len();
        self.cached = self.hist.len();
        let drafts = std::mem::take(&mut self.drafts);
        for (i, &x) in drafts.iter().enumerate() {
            let row = &logits[i * v..(i + 1) * v];
            match accept_draft(row, self.n_valid, self.sampling, x, &mut self.rng) {
                Ok(x) => {
                    self.stats.accepted += 1;
                    self.hist.push(x);
                    self.cached += 1;
                    out.push(x);
                }
                Err(y) => {
                    // An edit point: draft only as far as this pass got, plus one.
                    self.draft_len = i + 1;
                    self.hist.push(y);
                    out.push(y);
                    return out;
                }
            }
        }
        if !drafts.is_empty() && drafts.len() >= self.draft_len {
            // Every draft kept (copying a span): draft further next time.
            let max = self.lookup.map_or(1, |c| c.max_draft.max(1));
            self.draft_len = (self.draft_len * 2).min(max);
        }
        let row = &logits[drafts.len() * v..(drafts.len() + 1) * v];
        let t = sample(row, self.n_valid, self.sampling, &mut self.rng);
        self.hist.push(t);
        out.push(t);
        out
    }
}

/// Like [`crate::generate::generate_after`], with lookup-first decoding (`lookup = None`:
/// plain decoding through the same code path). Returns the new ids and the counters.
#[allow(clippy::too_many_arguments)]
pub fn generate_lookup(
    model: &Model,
    cache: &mut KvCache,
    new_tokens: &[u32],
    max_new: usize,
    s: Sampling,
    seed: u64,
    n_valid: usize,
    stop_token: Option<u32>,
    lookup: Option<LookupConfig>,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, LookupStats)> {
    let n = cache.len();
    run(
        model,
        cache,
        &[],
        n,
        new_tokens,
        max_new,
        s,
        seed,
        n_valid,
        stop_token,
        lookup,
        on_token,
    )
}

/// [`generate_lookup`] with a prefix already in `cache` whose tokens are `prefix`: they join
/// the lookup memory (a packed repository, a source file being edited).
#[allow(clippy::too_many_arguments)]
pub fn generate_lookup_with_prefix(
    model: &Model,
    cache: &mut KvCache,
    prefix: &[u32],
    new_tokens: &[u32],
    max_new: usize,
    s: Sampling,
    seed: u64,
    n_valid: usize,
    stop_token: Option<u32>,
    lookup: Option<LookupConfig>,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, LookupStats)> {
    if lookup.is_some() && model.cfg.engram.is_some() {
        bail!("lookup decoding is not supported for Engram models yet (rejected drafts cannot rewind the Engram decode state)");
    }
    if cache.len() != prefix.len() {
        bail!(
            "the cache holds {} positions but {} prefix tokens were given",
            cache.len(),
            prefix.len()
        );
    }
    run(
        model, cache, prefix, 0, new_tokens, max_new, s, seed, n_valid, stop_token, lookup,
        on_token,
    )
}

/// The decode loop; the decoder's position `i` is the cache's position `base + i`.
#[allow(clippy::too_many_arguments)]
fn run(
    model: &Model,
    cache: &mut KvCache,
    prefix: &[u32],
    base: usize,
    new_tokens: &[u32],
    max_new: usize,
    s: Sampling,
    seed: u64,
    n_valid: usize,
    stop_token: Option<u32>,
    lookup: Option<LookupConfig>,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, LookupStats)> {
    if new_tokens.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let logits = model.forward_cached(new_tokens, cache)?;
    let mut all = prefix.to_vec();
    all.extend_from_slice(new_tokens);
    let mut dec = SeqDecoder::new(&all, s, seed, n_valid, lookup);
    let mut out = Vec::new();
    let mut next = vec![dec.start(&logits)];
    loop {
        for &t in &next {
            if Some(t) == stop_token || out.len() >= max_new {
                return Ok((out, dec.stats));
            }
            out.push(t);
            on_token(t)?;
        }
        if out.len() >= max_new {
            return Ok((out, dec.stats));
        }
        let room = cache.capacity() - cache.len();
        let feed = dec.feed(room, max_new - out.len());
        if feed.is_empty() {
            return Ok((out, dec.stats));
        }
        let from = dec.logits_from();
        let mut seqs = [BatchSeq {
            tokens: &feed,
            cache: &mut *cache,
            logits_from: from,
        }];
        let logits = forward_batch(model, &mut seqs)?.pop().unwrap_or_default();
        next = dec.step(&logits);
        cache.truncate(base + dec.cached())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::generate::generate;
    use crate::kernels::rope::RopeLayout;

    fn tiny(seed: u64) -> Model {
        let cfg = ModelConfig {
            vocab_size: 29,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10000.0,
            rope_dim: 8,
            rope_layout: RopeLayout::Half,
            ffn_hidden: 48,
            tied_embeddings: false,
            norm_eps: 1e-5,
            init_std: 0.5,
            max_seq_len: 400,
            ..ModelConfig::dense_defaults()
        };
        let mut m = Model::new(cfg).unwrap();
        m.init(seed);
        m
    }

    const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };

    #[test]
    fn propose_continues_the_most_recent_match() {
        let cfg = LookupConfig::default();
        let h = [1, 2, 3, 9, 1, 2, 3, 4, 5, 6, 7, 2, 3];
        assert_eq!(propose(&h, &cfg, 3), vec![4, 5, 6]);
        assert_eq!(propose(&h, &cfg, 10), vec![4, 5, 6, 7, 2, 3]);
        assert!(propose(&[5, 6, 7], &cfg, 4).is_empty());
        assert_eq!(confident_next(&[1, 2, 1, 2, 1], 1, 0.9), Some(2));
        assert_eq!(confident_next(&[1, 2, 1, 3, 1], 1, 0.9), None);
    }

    #[test]
    fn greedy_lookup_output_equals_plain_greedy_token_for_token() {
        for seed in [1u64, 2, 3] {
            let m = tiny(seed);
            // A prompt with repeated text, so that drafts are proposed and (partly) kept.
            let unit: Vec<u32> = (0..17).map(|i| (i * 7 % 29) as u32).collect();
            let mut prompt = unit.clone();
            prompt.extend_from_slice(&unit);
            prompt.extend_from_slice(&unit[..5]);
            let want = generate(&m, &prompt, 120, GREEDY, 0, 29, None, |_| Ok(())).unwrap();
            let mut c = KvCache::new(&m);
            let (got, st) = generate_lookup(
                &m,
                &mut c,
                &prompt,
                120,
                GREEDY,
                0,
                29,
                None,
                Some(LookupConfig::default()),
                |_| Ok(()),
            )
            .unwrap();
            assert_eq!(got, want, "seed {seed}");
            assert!(st.drafted > 0, "{st:?}");
            assert!(st.accepted > 0, "{st:?}");
            assert!(st.passes < 120, "{st:?}");
            // Without lookup, through the same code path.
            let mut c = KvCache::new(&m);
            let (plain, _) =
                generate_lookup(&m, &mut c, &prompt, 120, GREEDY, 0, 29, None, None, |_| {
                    Ok(())
                })
                .unwrap();
            assert_eq!(plain, want);
            // A stop token and a short budget end it the same way as plain decoding.
            let stop = want[10];
            let w2 = generate(&m, &prompt, 50, GREEDY, 0, 29, Some(stop), |_| Ok(())).unwrap();
            let mut c = KvCache::new(&m);
            let (g2, _) = generate_lookup(
                &m,
                &mut c,
                &prompt,
                50,
                GREEDY,
                0,
                29,
                Some(stop),
                Some(LookupConfig::default()),
                |_| Ok(()),
            )
            .unwrap();
            assert_eq!(g2, w2);
        }
    }

    /// A tiny model whose linear layers also have quantised copies (`Q4_1`, `Q4_0`, `Q8_0`),
    /// as a GGUF model has: every cached row (prefill, one-token decoding, verification) uses
    /// the quantised products (8-bit activations).
    fn tiny_quantised(seed: u64) -> Model {
        use crate::kernels::quant::{quantize_matrix, QType};
        let cfg = ModelConfig {
            vocab_size: 29,
            d_model: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            rope_theta: 10000.0,
            rope_dim: 16,
            rope_layout: RopeLayout::Half,
            ffn_hidden: 96,
            tied_embeddings: false,
            norm_eps: 1e-5,
            init_std: 0.5,
            max_seq_len: 400,
            ..ModelConfig::dense_defaults()
        };
        let mut m = Model::new(cfg).unwrap();
        m.init(seed);
        let c = m.cfg.clone();
        let (d, f, v, qd) = (c.d_model, c.ffn_hidden, c.vocab_size, c.qkv_dim());
        let mut mats = vec![(m.layout.output, v, d, QType::Q8_0)];
        for lo in &m.layout.layers {
            mats.push((lo.wqkv, qd, d, QType::Q4_1));
            mats.push((lo.wo, d, c.n_heads * c.head_dim, QType::Q4_0));
            if let crate::model::Ffn::Dense { w13, w2 } = lo.ffn {
                mats.push((w13, 2 * f, d, QType::Q8_0));
                mats.push((w2, d, f, QType::Q4_1));
            }
        }
        for (off, rows, cols, ty) in mats {
            let q = quantize_matrix(ty, rows, cols, &m.params[off..off + rows * cols]);
            m.quant.insert(off, q);
        }
        m
    }

    #[test]
    fn greedy_lookup_equals_plain_greedy_on_a_quantised_model() {
        for seed in [1u64, 2] {
            let m = tiny_quantised(seed);
            assert_eq!(m.quant.len(), 9);
            let unit: Vec<u32> = (0..17).map(|i| (i * 7 % 29) as u32).collect();
            let mut prompt = unit.clone();
            prompt.extend_from_slice(&unit);
            prompt.extend_from_slice(&unit[..6]);
            // A verification pass's rows are bit-identical to one-token decoding's logits.
            let rows: Vec<u32> = (0..7).map(|i| (i * 5 % 29) as u32).collect();
            let mut c = KvCache::new(&m);
            m.forward_cached(&prompt, &mut c).unwrap();
            let all = crate::batch::forward_all(&m, &rows, &mut c).unwrap();
            let mut c = KvCache::new(&m);
            m.forward_cached(&prompt, &mut c).unwrap();
            for (i, &t) in rows.iter().enumerate() {
                let one = m.forward_cached(&[t], &mut c).unwrap();
                assert_eq!(&all[i * 29..(i + 1) * 29], &one[..], "seed {seed} row {i}");
            }
            let want = generate(&m, &prompt, 200, GREEDY, 0, 29, None, |_| Ok(())).unwrap();
            for adaptive in [true, false] {
                let cfg = LookupConfig {
                    adaptive,
                    ..Default::default()
                };
                let mut c = KvCache::new(&m);
                let (got, st) = generate_lookup(
                    &m,
                    &mut c,
                    &prompt,
                    200,
                    GREEDY,
                    0,
                    29,
                    None,
                    Some(cfg),
                    |_| Ok(()),
                )
                .unwrap();
                assert_eq!(got, want, "seed {seed} adaptive {adaptive}");
                // Multi-row verification passes ran, and some drafts were kept.
                assert!(st.drafted > 0 && st.accepted > 0, "{st:?}");
                assert!(st.passes < 200, "{st:?}");
            }
        }
    }

    #[test]
    fn adaptive_drafting_shrinks_after_rejections_and_grows_while_kept() {
        let cfg = LookupConfig::default();
        let v = 5;
        let onehot = |t: usize| {
            let mut l = vec![0.0f32; v];
            l[t] = 1.0;
            l
        };
        // History 0 1 2 3 4 0 1 → drafts continue "2 3 4 ...".
        let mut dec = SeqDecoder::new(&[0, 1, 2, 3, 4, 0], GREEDY, 0, v, Some(cfg));
        dec.start(&onehot(1));
        let f = dec.feed(100, 100);
        assert_eq!(f, vec![1, 2, 3], "pending + 2 drafts (initial length 2)");
        // All kept: the next draft length doubles.
        let mut l = onehot(2);
        l.extend(onehot(3));
        l.extend(onehot(4));
        assert_eq!(dec.step(&l), vec![2, 3, 4]);
        let f = dec.feed(100, 100);
        assert_eq!(f.len(), 1 + 4, "{f:?}");
        // First draft rejected: the next pass drafts one token.
        let mut l = onehot(2);
        for _ in 0..4 {
            l.extend(onehot(0));
        }
        assert_eq!(dec.step(&l), vec![2]);
        let f = dec.feed(100, 100);
        assert!(f.len() <= 2, "{f:?}");
    }

    #[test]
    fn greedy_lookup_equals_plain_greedy_up_to_a_full_context() {
        let m = tiny(7);
        let prompt: Vec<u32> = (0..300).map(|i| (i % 13) as u32).collect();
        let want = generate(&m, &prompt, 500, GREEDY, 0, 29, None, |_| Ok(())).unwrap();
        let mut c = KvCache::new(&m);
        let (got, _) = generate_lookup(
            &m,
            &mut c,
            &prompt,
            500,
            GREEDY,
            0,
            29,
            None,
            Some(LookupConfig::default()),
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(got, want);
    }

    /// Chi-square test of the acceptance rule: the emitted token's frequencies match `p`,
    /// whichever draft is proposed (likely, unlikely, or outside the top-p set).
    #[test]
    fn speculative_acceptance_is_distribution_exact() {
        let logits = [1.0f32, 2.0, 0.5, -1.0, 1.5, 0.0];
        let s = Sampling {
            temperature: 0.9,
            top_k: 0,
            top_p: 0.95,
        };
        let dist = distribution(&logits, 6, s);
        let mut p = [0.0f64; 6];
        for &(t, q) in &dist {
            p[t as usize] = q;
        }
        let mut rng = Rng::new(11);
        let n = 200_000usize;
        for draft in [1u32, 3, 5, 2] {
            let mut counts = [0usize; 6];
            for _ in 0..n {
                let t = match accept_draft(&logits, 6, s, draft, &mut rng) {
                    Ok(t) | Err(t) => t,
                };
                counts[t as usize] += 1;
            }
            let mut chi2 = 0.0;
            let mut dof = 0;
            for i in 0..6 {
                if p[i] == 0.0 {
                    assert_eq!(counts[i], 0, "draft {draft}: token {i} is outside top-p");
                    continue;
                }
                let e = p[i] * n as f64;
                chi2 += (counts[i] as f64 - e).powi(2) / e;
                dof += 1;
            }
            // 99.9% quantile of chi-square with ≤ 5 degrees of freedom is 20.5.
            assert!(chi2 < 20.5, "draft {draft}: chi2 {chi2} (dof {})", dof - 1);
        }
    }

    #[test]
    fn sampled_lookup_keeps_the_model_distribution() {
        // The first token after a repetitive prompt, with and without lookup: same frequencies.
        let m = tiny(3);
        let unit: Vec<u32> = (0..9).map(|i| (i * 5 % 29) as u32).collect();
        let prompt: Vec<u32> = unit.iter().cycle().take(40).copied().collect();
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        };
        // Frequencies of the second generated token (the first one that can be a draft).
        let runs = 1500;
        let mut a = [0usize; 29];
        let mut b = [0usize; 29];
        for seed in 0..runs {
            let mut c = KvCache::new(&m);
            let (g, _) = generate_lookup(
                &m,
                &mut c,
                &prompt,
                2,
                s,
                seed,
                29,
                None,
                Some(LookupConfig::default()),
                |_| Ok(()),
            )
            .unwrap();
            a[g[1] as usize] += 1;
            let g = generate(&m, &prompt, 2, s, seed + 100_000, 29, None, |_| Ok(())).unwrap();
            b[g[1] as usize] += 1;
        }
        // Two-sample chi-square over tokens seen at least 20 times in all.
        let mut chi2 = 0.0;
        let mut dof = 0;
        for i in 0..29 {
            let t = a[i] + b[i];
            if t >= 20 {
                let e = t as f64 / 2.0;
                chi2 += (a[i] as f64 - e).powi(2) / e + (b[i] as f64 - e).powi(2) / e;
                dof += 1;
            }
        }
        assert!(dof >= 2, "{a:?} {b:?}");
        // Generous bound (99.9% for up to ~28 dof is 56.9).
        assert!(chi2 < 56.9, "chi2 {chi2} dof {dof}: {a:?} vs {b:?}");
    }
}
