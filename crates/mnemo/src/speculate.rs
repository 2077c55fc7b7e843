//! MTP speculative decoding (DeepSeek-V4): the model's own MTP block drafts `K` tokens, the
//! main model verifies them in one cached forward, and the longest prefix it agrees with is
//! kept plus one token of its own (as lookup-first decoding, [`crate::lookup`], keeps N-gram
//! drafts).
//!
//! ```text
//! state: main cache holds positions 0..n; t_n (sampled, pending) is not yet in it;
//!        the MTP block's own cache holds positions 0..m (m ≤ n), and the main model's last
//!        streams X^L of positions m..n wait for it (`pend`)
//! draft: MTP block 0 over positions m..n with (X^L[p], E[t_{p+1}])  → d_1 = argmax, G_{n−1}
//!        then K − 1 times: one row at position n − 2 + i with (G_{previous}, E[d_{i−1}])
//!        → d_i = argmax (the one block repeated on its own output streams, as DeepSeek's
//!        MTP drafting does); the block's cache is rolled back to n (drafted rows dropped)
//! verify: main model over [t_n, d_1..d_K] at positions n..n+K (one forward, every row's
//!         logits and X^L); keep d_1..d_a while the acceptance rule keeps them, then the
//!         main model's token at the first rejection (or after d_K); roll the main cache
//!         back to n + 1 + a; X^L of positions n..n+a join `pend`
//! ```
//!
//! Only MTP block 0 drafts: a model with `D > 1` blocks (none released) would chain them,
//! which needs each deeper block's input streams kept per verified position; not done.
//!
//! Acceptance is [`crate::lookup::accept_draft`], the rule for a deterministic drafter: the
//! draft is the MTP block's argmax, a function of the verified tokens, so at temperature 0 a
//! draft is kept iff it is the main model's argmax (the output is plain greedy decoding's,
//! token for token, up to f32 rounding of products over different row counts), and at
//! temperature > 0 each emitted token is distributed exactly as the main model's sampling
//! distribution (a different random stream than plain sampling with the same seed).

use crate::batch::BatchSeq;
use crate::generate::{sample, KvCache, Sampling, PREFILL_CHUNK};
use crate::lookup::{accept_draft, LookupStats};
use crate::model::attention_v4_cache::V4_ROLLBACK;
use crate::model::Model;
use crate::rng::Rng;
use anyhow::{bail, Result};

/// Draft tokens per verification pass at most (the V4 caches roll back that far).
pub const MAX_DRAFT_LEN: usize = V4_ROLLBACK - 1;

/// Check that `model` can draft with its MTP block `draft_len` tokens at a time.
pub fn check_mtp(model: &Model, draft_len: usize) -> Result<()> {
    if model.cfg.mtp_layers() == 0 {
        bail!(
            "the model has no MTP block (v4.num_nextn_predict_layers = 0; a transformers-layout \
             or official-layout directory loads without one): MTP speculation needs one \
             (use lookup speculation instead)"
        );
    }
    if model.cfg.engram.is_some() {
        bail!("MTP speculation is not supported for Engram models");
    }
    if draft_len == 0 || draft_len > MAX_DRAFT_LEN {
        bail!("the draft length must be in 1..={MAX_DRAFT_LEN} (got {draft_len})");
    }
    Ok(())
}

/// The drafting side: MTP block 0's cache and the main model's last streams it still has to
/// read.
struct Drafter {
    cache: KvCache,
    /// `X^L` of positions `cache.len()..main.len()` `[rows, w]`.
    pend: Vec<f32>,
    w: usize,
}

impl Drafter {
    /// Run the block over the waiting positions `cache.len()..upto` (their next tokens in
    /// `hist`), dropping them from `pend`; `None` when there are none. Returns the last row's
    /// logits and streams.
    fn catch_up(
        &mut self,
        model: &Model,
        hist: &[u32],
        upto: usize,
    ) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let p0 = self.cache.len();
        if upto <= p0 {
            return Ok(None);
        }
        let n = upto - p0;
        let next = &hist[p0 + 1..upto + 1];
        let rows =
            model.mtp_forward_cached(0, &self.pend[..n * self.w], next, &mut self.cache, n - 1)?;
        self.pend.drain(..n * self.w);
        let last = rows.streams[(n - 1) * self.w..].to_vec();
        Ok(Some((rows.logits, last)))
    }
}

/// Like [`crate::generate::generate_after`] (from an empty `cache`) with MTP speculation,
/// `draft_len` tokens drafted per pass (module docs). Returns the new ids and the counters
/// (`passes`: verification passes after the prefill; `drafted`, `accepted`: MTP drafts).
#[allow(clippy::too_many_arguments)]
pub fn generate_mtp(
    model: &Model,
    cache: &mut KvCache,
    prompt: &[u32],
    max_new: usize,
    s: Sampling,
    seed: u64,
    n_valid: usize,
    stop_token: Option<u32>,
    draft_len: usize,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, LookupStats)> {
    check_mtp(model, draft_len)?;
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    if !cache.is_empty() {
        bail!(
            "MTP speculation starts from an empty cache (its MTP block reads the main model's \
             streams of every position)"
        );
    }
    let v = model.cfg.vocab_size;
    let w = crate::model::residual::Stream::of(&model.cfg).width();
    let mut dr = Drafter {
        cache: KvCache::with_capacity(model, cache.capacity()),
        pend: Vec::new(),
        w,
    };
    let mut hist = prompt.to_vec();
    // Prefill as `forward_cached` does (same chunks, same rows), keeping X^L; the MTP block
    // follows chunk by chunk over the positions whose next token is known.
    let mut logits = Vec::new();
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        let mut seq = [BatchSeq {
            tokens: chunk,
            cache: &mut *cache,
            logits_from: chunk.len() - 1,
        }];
        let (mut lg, xl) = model.forward_batch_streams(&mut seq)?;
        logits = lg.pop().unwrap_or_default();
        dr.pend.extend_from_slice(&xl);
        dr.catch_up(model, &hist, cache.len().min(hist.len() - 1))?;
    }
    let greedy = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };
    let mut rng = Rng::new(seed);
    let mut stats = LookupStats::default();
    let mut out = Vec::new();
    let mut next = vec![sample(&logits, n_valid, s, &mut rng)];
    loop {
        for &t in &next {
            if Some(t) == stop_token || out.len() >= max_new {
                return Ok((out, stats));
            }
            out.push(t);
            hist.push(t);
            on_token(t)?;
        }
        let n = cache.len();
        debug_assert_eq!(hist.len(), n + 1);
        let room = cache.capacity() - n;
        if out.len() >= max_new || room == 0 {
            return Ok((out, stats));
        }
        // Drafts: none past the cache or past the tokens still wanted.
        let k = draft_len.min(room - 1).min(max_new - out.len() - 1);
        let mut feed = vec![hist[n]];
        if k > 0 {
            let Some((lg, mut g)) = dr.catch_up(model, &hist, n)? else {
                bail!("MTP drafting: no position to draft from");
            };
            let mut d = sample(&lg, n_valid, greedy, &mut rng);
            feed.push(d);
            let verified = dr.cache.len();
            for _ in 1..k {
                let r = model.mtp_forward_cached(0, &g, &[d], &mut dr.cache, 0)?;
                d = sample(&r.logits, n_valid, greedy, &mut rng);
                g = r.streams;
                feed.push(d);
            }
            dr.cache.truncate(verified)?;
        }
        let mut seq = [BatchSeq {
            tokens: &feed,
            cache: &mut *cache,
            logits_from: 0,
        }];
        let (mut lg, xl) = model.forward_batch_streams(&mut seq)?;
        let lg = lg.pop().unwrap_or_default();
        stats.passes += 1;
        stats.drafted += k;
        next.clear();
        let mut kept = 0;
        let mut rejected = false;
        for (i, &x) in feed[1..].iter().enumerate() {
            match accept_draft(&lg[i * v..(i + 1) * v], n_valid, s, x, &mut rng) {
                Ok(x) => {
                    next.push(x);
                    kept += 1;
                }
                Err(y) => {
                    next.push(y);
                    rejected = true;
                    break;
                }
            }
        }
        if !rejected {
            // Every draft kept: the main model's token after the last one.
            next.push(sample(&lg[k * v..(k + 1) * v], n_valid, s, &mut rng));
        }
        stats.accepted += kept;
        cache.truncate(n + 1 + kept)?;
        dr.pend.extend_from_slice(&xl[..(kept + 1) * w]);
    }
}

#[cfg(test)]
#[path = "speculate_tests.rs"]
mod tests;
