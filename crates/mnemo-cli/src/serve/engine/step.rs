//! One engine step: a single batched forward ([`mnemo::batch::forward_batch`]) over the rows of
//! every active sequence, so each weight block is read once per step for all of them.
//!
//! ```text
//! rows = [one prefill chunk (≤ prefill_chunk rows while others decode, else ≤ PREFILL_CHUNK)]
//!        ++ [pending token (+ lookup drafts) of every decoding sequence]
//! ```
//!
//! Fairness: sequences join in arrival order (the request channel is FIFO); prefilling ones
//! take turns, a chunk each, least recently served first; every decoding sequence advances
//! every step. So a long prompt delays the others by one bounded chunk per step instead of its
//! whole prefill, a short prompt behind it waits at most one turn per sequence prefilling,
//! and no request starves. Each row keeps its own arithmetic (per-sequence
//! plan of `model::decode`): decode rows run exactly as one-token decoding, chunk rows as a
//! fresh prefill (module [`super::prefix`]).

use super::prefix::next_chunk;
use super::seq::{Event, Phase, Seq};
use super::Engine;
use mnemo::batch::{forward_batch, BatchSeq};
use mnemo::generate::PREFILL_CHUNK;
use std::sync::atomic::Ordering;

/// What a sequence runs in a step.
enum Part {
    /// Prompt rows `from..to` (logits of the last).
    Chunk { from: usize, to: usize },
    /// Its pending token and drafts (logits of the rows from `dec.logits_from()`).
    Decode(Vec<u32>),
}

impl Engine {
    /// The rows a prefilling sequence runs this step, `(index, from, to)`: the least recently
    /// served one (the oldest among those not served yet), so prefilling sequences take turns
    /// and a short prompt is not held up by a long one before it.
    fn chunk_of(&self, active: &[Seq], others_decode: bool) -> Option<(usize, usize, usize)> {
        let i = (0..active.len())
            .filter(|&i| !active[i].finished && matches!(active[i].phase, Phase::Prefill { .. }))
            .min_by_key(|&i| (active[i].turn, i))?;
        let s = &active[i];
        let Phase::Prefill {
            done,
            alone_last,
            snap,
        } = s.phase
        else {
            unreachable!()
        };
        let max = match others_decode {
            true => self.cfg.prefill_chunk,
            false => PREFILL_CHUNK,
        };
        let k = match snap {
            Some(sp) if done < sp => next_chunk(sp - done, false, max),
            _ => next_chunk(s.req.prompt.len() - done, alone_last, max),
        };
        Some((i, done, done + k))
    }

    pub(super) fn step(&mut self, active: &mut [Seq]) {
        let model = self.model.clone();
        let tok = self.tok.clone();
        let mut parts: Vec<(usize, Part)> = Vec::new();
        for (i, s) in active.iter_mut().enumerate() {
            if s.finished || !matches!(s.phase, Phase::Decode) {
                continue;
            }
            let room = s.cache.capacity() - s.cache.len();
            let budget = s.req.max_tokens.saturating_sub(s.ids.len());
            let f = s.dec.feed(room, budget.max(1));
            if f.is_empty() {
                s.flush_all();
                s.finish("length", &self.shared);
                continue;
            }
            parts.push((i, Part::Decode(f)));
        }
        self.steps += 1;
        if let Some((i, from, to)) = self.chunk_of(active, !parts.is_empty()) {
            active[i].turn = self.steps;
            parts.push((i, Part::Chunk { from, to }));
        }
        if parts.is_empty() {
            return;
        }
        // In the order of `active` (oldest first), one forward for all of them.
        parts.sort_by_key(|p| p.0);
        let mut batch: Vec<BatchSeq> = Vec::with_capacity(parts.len());
        {
            let mut pi = parts.iter().peekable();
            for (i, s) in active.iter_mut().enumerate() {
                let Some((_, part)) = pi.next_if(|p| p.0 == i) else {
                    continue;
                };
                batch.push(match part {
                    Part::Chunk { from, to } => BatchSeq {
                        tokens: &s.req.prompt[*from..*to],
                        cache: &mut s.cache,
                        logits_from: to - from - 1,
                    },
                    Part::Decode(f) => BatchSeq {
                        tokens: f,
                        cache: &mut s.cache,
                        logits_from: s.dec.logits_from(),
                    },
                });
            }
        }
        let res = forward_batch(&model, &mut batch);
        drop(batch);
        let logits = match res {
            Ok(l) => l,
            Err(e) => {
                // (Rows are checked before any cache is touched; this is an internal error.)
                for (i, _) in &parts {
                    active[*i].send(Event::Error(format!("{e:#}")));
                    active[*i].finished = true;
                }
                return;
            }
        };
        for ((i, part), l) in parts.into_iter().zip(logits) {
            match part {
                Part::Chunk { to, .. } => self.chunk_done(&mut active[i], to, &l),
                Part::Decode(_) => {
                    let s = &mut active[i];
                    let (d0, a0) = (s.dec.stats.drafted, s.dec.stats.accepted);
                    let toks = s.dec.step(&l);
                    self.shared
                        .drafted
                        .fetch_add((s.dec.stats.drafted - d0) as u64, Ordering::Relaxed);
                    self.shared
                        .accepted
                        .fetch_add((s.dec.stats.accepted - a0) as u64, Ordering::Relaxed);
                    if let Err(e) = s.cache.truncate(s.dec.cached()) {
                        s.send(Event::Error(format!("{e:#}")));
                        s.finished = true;
                        continue;
                    }
                    s.accept(&toks, &tok, &self.shared);
                }
            }
        }
    }

    /// A prefill chunk ending at prompt position `to` has run (`logits`: of its last row).
    fn chunk_done(&mut self, s: &mut Seq, to: usize, logits: &[f32]) {
        let Phase::Prefill {
            alone_last, snap, ..
        } = s.phase
        else {
            return;
        };
        if to == s.req.prompt.len() {
            let t = s.dec.start(logits);
            s.phase = Phase::Decode;
            // The first token goes out before the prompt is remembered.
            let tok = self.tok.clone();
            s.accept(&[t], &tok, &self.shared);
            self.remember_prompt(s);
            return;
        }
        if snap == Some(to) {
            self.remember(&s.req.prompt[..to], &s.cache);
        }
        s.phase = Phase::Prefill {
            done: to,
            alone_last,
            snap,
        };
    }
}
