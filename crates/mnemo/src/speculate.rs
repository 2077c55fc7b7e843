//! MTP speculative decoding (DeepSeek-V4): the model's own MTP block drafts `K` tokens, the
//! main model verifies them in one cached forward, and the longest prefix it agrees with is
//! kept plus one token of its own (as lookup-first decoding, [`crate::lookup`], keeps N-gram
//! drafts).
//!
//! ```text
//! state: the main cache holds positions 0..N; t_N (sampled, pending) is not yet in it.
//!        MTP block j at position p reads H^j[p] (X^L[p] of the main model for j = 0, block
//!        j − 1's output at p otherwise) and E[t_{p+1+j}]; its verified rows are p < N − j,
//!        and its own cache holds exactly those between passes (`Drafter`)
//! draft: every block runs its verified rows not yet run (block 0's last, at N − 1, drafts
//!        d_1 = argmax); block j = 1..min(K, D) − 1 runs its j draft-dependent rows
//!        at positions N − j..N − 1 (the last reads E[d_j]) → d_{j+1}: the blocks chained at position N − 1,
//!        as trained; past D the last block is repeated on its own output streams, one row a
//!        step (as DeepSeek's MTP drafting repeats its one block); then every block's cache
//!        is rolled back to its verified rows
//! verify: the main model over [t_N, d_1..d_K] at positions N..N+K (one forward, every row's
//!         logits and X^L); keep d_1..d_a while the acceptance rule keeps them, then the
//!         main model's token at the first rejection (or after d_K); roll the main cache
//!         back to N + 1 + a; X^L of positions N..N+a wait for block 0
//! ```
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
             directory, or an official one whose mtp.* tensors are incomplete, loads without \
             one): MTP speculation needs one (use lookup speculation instead)"
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

/// The drafting side: each MTP block's cache and the input streams waiting for it.
///
/// Block `j` at position `p` reads `H^j[p]` (the main model's `X^L[p]` for `j = 0`, block
/// `j − 1`'s output at `p` otherwise) and the token `t_{p+1+j}`: with the main model's cache
/// at `N` positions and `t_N` known, its verified rows are `p < V_j = N − j`. Between passes
/// block `j`'s cache holds exactly its verified rows, and `pend[j]` holds its inputs from its
/// cache's end to block `j − 1`'s (the main model's for `j = 0`).
pub(crate) struct Drafter {
    caches: Vec<KvCache>,
    pub(crate) pend: Vec<Vec<f32>>,
    pub(crate) w: usize,
}

impl Drafter {
    pub(crate) fn new(model: &Model, cap: usize) -> Self {
        let d = model.cfg.mtp_layers();
        Drafter {
            caches: (0..d).map(|_| KvCache::with_capacity(model, cap)).collect(),
            pend: vec![Vec::new(); d],
            w: crate::model::residual::Stream::of(&model.cfg).width(),
        }
    }

    /// Run every block over its verified rows not yet run (`p < min(n_main, hist.len() − 1 −
    /// j)`, inputs from `pend`), handing its outputs on to the next block. Returns block 0's
    /// last row (logits, output streams) when it ran.
    pub(crate) fn catch_up(
        &mut self,
        model: &Model,
        hist: &[u32],
        n_main: usize,
    ) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let w = self.w;
        let mut first = None;
        for j in 0..self.caches.len() {
            let c = self.caches[j].len();
            let v = n_main.min((hist.len() - 1).saturating_sub(j));
            if v <= c {
                continue;
            }
            let n = v - c;
            let next = &hist[c + 1 + j..v + 1 + j];
            let r = model.mtp_forward_cached(
                j,
                &self.pend[j][..n * w],
                next,
                &mut self.caches[j],
                n - 1,
            )?;
            self.pend[j].drain(..n * w);
            if let Some(p) = self.pend.get_mut(j + 1) {
                p.extend_from_slice(&r.streams);
            }
            if j == 0 {
                first = Some((r.logits, r.streams[(n - 1) * w..].to_vec()));
            }
        }
        Ok(first)
    }

    /// `k ≥ 1` drafts after `hist` (`t_0..t_N`, the main cache at `N`): blocks `0..min(k, D)`
    /// chained at position `N − 1` (block `j` over its `j` draft-dependent rows `V_j..N`),
    /// then the last block repeated on its own output streams; every block's cache is rolled
    /// back to its verified rows. Greedy drafts (argmax over `n_valid`).
    pub(crate) fn draft(
        &mut self,
        model: &Model,
        hist: &[u32],
        k: usize,
        n_valid: usize,
    ) -> Result<Vec<u32>> {
        let w = self.w;
        let n = hist.len() - 1;
        let argmax = |l: &[f32]| {
            let l = &l[..n_valid.min(l.len())];
            (0..l.len()).fold(0, |b, i| if l[i] > l[b] { i } else { b }) as u32
        };
        let Some((lg, mut g)) = self.catch_up(model, hist, n)? else {
            bail!("MTP drafting: no verified position to draft from");
        };
        let mut toks = hist.to_vec();
        let mut d = argmax(&lg);
        toks.push(d);
        let depth = k.min(self.caches.len());
        // Block j − 1's draft-dependent output rows (positions V_{j−1}..N).
        let mut prev: Vec<f32> = Vec::new();
        for j in 1..depth {
            let v = n - j;
            let mut h = self.pend[j].clone();
            h.extend_from_slice(&prev);
            let next = &toks[v + 1 + j..n + 1 + j];
            let r = model.mtp_forward_cached(j, &h, next, &mut self.caches[j], j - 1)?;
            d = argmax(&r.logits);
            toks.push(d);
            g = r.streams[(j - 1) * w..].to_vec();
            prev = r.streams;
        }
        let last = depth - 1;
        for _ in depth..k {
            let r = model.mtp_forward_cached(last, &g, &[d], &mut self.caches[last], 0)?;
            d = argmax(&r.logits);
            toks.push(d);
            g = r.streams;
        }
        for (j, c) in self.caches.iter_mut().enumerate().take(depth) {
            c.truncate(n - j)?;
        }
        Ok(toks.split_off(n + 1))
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
    let mut dr = Drafter::new(model, cache.capacity());
    let w = dr.w;
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
        dr.pend[0].extend_from_slice(&xl);
        dr.catch_up(model, &hist, cache.len())?;
    }
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
            feed.extend(dr.draft(model, &hist, k, n_valid)?);
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
        dr.pend[0].extend_from_slice(&xl[..(kept + 1) * w]);
    }
}

#[cfg(test)]
#[path = "speculate_tests.rs"]
mod tests;
