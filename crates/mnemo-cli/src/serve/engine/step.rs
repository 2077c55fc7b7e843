//! One engine step: a single batched forward ([`mnemo::batch::forward_batch`]) over the rows of
//! every active sequence, so each weight block is read once per step for all of them.
//!
//! ```text
//! rows = [prefill chunks of prefilling sequences, in turn, ≤ prefill_chunk rows in all while
//!         others decode (else ≤ PREFILL_CHUNK)]
//!        ++ [pending token (+ lookup drafts) of every decoding sequence]
//! ```
//!
//! Fairness: sequences join in arrival order (the request channel is FIFO); prefilling ones
//! take turns for the step's prefill rows, least recently served first; every decoding sequence advances
//! every step. So a long prompt delays the others by one bounded chunk per step instead of its
//! whole prefill, a short prompt behind it waits at most one turn per sequence prefilling,
//! and no request starves. Each row keeps its own arithmetic (per-sequence
//! plan of `model::decode`): decode rows run exactly as one-token decoding, chunk rows as a
//! fresh prefill (module [`super::prefix`]).

use super::prefix::next_chunk;
use super::seq::{Event, Phase, Request, Seq};
use super::Engine;
use mnemo::batch::{forward_batch, BatchSeq};
use mnemo::generate::PREFILL_CHUNK;
use mnemo::lookup::SeqDecoder;
use rayon::prelude::*;
use std::sync::atomic::Ordering;

/// What a sequence runs in a step.
enum Part {
    /// Prompt rows `from..to` (logits of the last).
    Chunk { from: usize, to: usize },
    /// Its pending token and drafts (logits of the rows from `dec.logits_from()`).
    Decode(Vec<u32>),
}

impl Engine {
    /// The prefill chunks of this step, `(index, from, to)`: prefilling sequences take turns,
    /// least recently served first (the oldest among those not served yet), each taking the
    /// next chunk its schedule allows within what is left of the step's row budget
    /// (`prefill_chunk` while others decode, else `PREFILL_CHUNK`). Several short prompts thus
    /// share one forward (one pass over the weights), and a short prompt is not held up by a
    /// long one before it.
    fn chunks_of(&self, active: &[Seq], others_decode: bool) -> Vec<(usize, usize, usize)> {
        let mut budget = match others_decode {
            true => self.cfg.prefill_chunk,
            false => PREFILL_CHUNK,
        };
        let mut order: Vec<usize> = (0..active.len())
            .filter(|&i| !active[i].finished && matches!(active[i].phase, Phase::Prefill { .. }))
            .collect();
        order.sort_by_key(|&i| (active[i].turn, i));
        let mut out = Vec::new();
        for i in order {
            // (A chunk may need 3 rows: see `next_chunk`.)
            if budget < 3 && !out.is_empty() {
                break;
            }
            let s = &active[i];
            let Phase::Prefill {
                done,
                alone_last,
                snap,
            } = s.phase
            else {
                continue;
            };
            let k = match snap {
                Some(sp) if done < sp => next_chunk(sp - done, false, budget),
                _ => next_chunk(s.req.prompt.len() - done, alone_last, budget),
            };
            budget = budget.saturating_sub(k);
            out.push((i, done, done + k));
        }
        out
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
        for (i, from, to) in self.chunks_of(active, !parts.is_empty()) {
            active[i].turn = self.steps;
            parts.push((i, Part::Chunk { from, to }));
        }
        if parts.is_empty() {
            return;
        }
        // One forward for all of them: the prompt chunks together, then the decode rows (each
        // kind one run of rows, so each weight is read once per step for all of them).
        parts.sort_by_key(|p| (matches!(p.1, Part::Decode(_)), p.0));
        let mut seqs: Vec<Option<&mut Seq>> = active.iter_mut().map(Some).collect();
        let mut batch: Vec<BatchSeq> = Vec::with_capacity(parts.len());
        for (i, part) in &parts {
            let Seq {
                req, cache, dec, ..
            } = seqs[*i].take().expect("one part per sequence");
            let req: &Request = req;
            batch.push(match part {
                Part::Chunk { from, to } => BatchSeq {
                    tokens: &req.prompt[*from..*to],
                    cache,
                    logits_from: to - from - 1,
                },
                Part::Decode(f) => BatchSeq {
                    tokens: f,
                    cache,
                    logits_from: dec.logits_from(),
                },
            });
        }
        let res = forward_batch(&model, &mut batch);
        drop(batch);
        drop(seqs);
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
        // Sampling (and draft verification) of the decoding sequences in parallel: each
        // touches only its own decoder. Then, in order, events and prompt-cache entries.
        let mut decs: Vec<Option<&mut SeqDecoder>> =
            active.iter_mut().map(|s| Some(&mut s.dec)).collect();
        let jobs: Vec<(&mut SeqDecoder, &[f32])> = parts
            .iter()
            .zip(&logits)
            .filter(|((_, p), _)| matches!(p, Part::Decode(_)))
            .map(|((i, _), l)| (decs[*i].take().expect("one part per sequence"), &l[..]))
            .collect();
        let sampled: Vec<(Vec<u32>, usize, usize)> = jobs
            .into_par_iter()
            .map(|(d, l)| {
                let (d0, a0) = (d.stats.drafted, d.stats.accepted);
                let toks = d.step(l);
                (toks, d.stats.drafted - d0, d.stats.accepted - a0)
            })
            .collect();
        drop(decs);
        let mut sampled = sampled.into_iter();
        for ((i, part), l) in parts.into_iter().zip(logits) {
            match part {
                Part::Chunk { to, .. } => self.chunk_done(&mut active[i], to, &l),
                Part::Decode(_) => {
                    let (toks, drafted, accepted) = sampled.next().expect("one per decode part");
                    self.shared
                        .drafted
                        .fetch_add(drafted as u64, Ordering::Relaxed);
                    self.shared
                        .accepted
                        .fetch_add(accepted as u64, Ordering::Relaxed);
                    let s = &mut active[i];
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
