//! One request's sequence inside the engine: its decode state, the text sent so far, and how
//! newly generated tokens become events (stop sequences, end of text, `max_tokens`).

use super::Shared;
use mnemo::generate::{KvCache, Sampling};
use mnemo::lookup::SeqDecoder;
use mnemo::tokenizer::{DecodeState, Tokenizer};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What the engine sends back for one request.
#[derive(Debug)]
pub enum Event {
    /// New text (complete UTF-8; never a partial stop sequence).
    Text(String),
    Done(Finish),
    Error(String),
}

#[derive(Debug, Clone)]
pub struct Finish {
    /// `stop` (end of text or a stop sequence) or `length` (max_tokens or the context).
    pub reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens taken from the prompt cache instead of prefilled.
    pub cached_tokens: usize,
    /// From the request's arrival to its first generated token (none when there was none).
    pub ttft: Option<Duration>,
}

/// One generation request, already tokenised and validated.
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Lookup-first decoding for this request: `None` follows the server's `--lookup`.
    pub lookup: Option<bool>,
    /// When the HTTP side received the request (time to first token counts from here).
    pub arrived: Instant,
    pub tx: mpsc::UnboundedSender<Event>,
}

pub(super) enum Phase {
    /// Prompt positions `..done` are in the cache; `alone_last`: the prompt's last row runs
    /// as a chunk of its own; `snap`: keep the state at this position in the prompt cache
    /// (module [`super::prefix`]).
    Prefill {
        done: usize,
        alone_last: bool,
        snap: Option<usize>,
    },
    Decode,
}

pub(super) struct Seq {
    pub(super) req: Request,
    pub(super) cache: KvCache,
    pub(super) dec: SeqDecoder,
    pub(super) phase: Phase,
    pub(super) ids: Vec<u32>,
    /// Incremental detokeniser of `ids` (decodes a short window per token).
    pub(super) detok: DecodeState,
    /// Text of `ids` so far (complete characters), `text[..sent]` sent.
    pub(super) text: String,
    pub(super) sent: usize,
    pub(super) cached_tokens: usize,
    /// When the first token, and the latest, were generated.
    pub(super) first_at: Option<Instant>,
    pub(super) last_at: Option<Instant>,
    pub(super) finished: bool,
    /// The client has gone (its receiver was dropped).
    pub(super) gone: bool,
    /// The engine step that last ran a prefill chunk of it (0: none yet): prefilling
    /// sequences take turns, least recently served first.
    pub(super) turn: u64,
}

/// The longest suffix of `text` that is a proper prefix of one of `stops` (held back).
pub(super) fn held_back(text: &str, stops: &[String]) -> usize {
    let mut best = 0;
    for s in stops {
        for k in (1..s.len().min(text.len() + 1)).rev() {
            if k <= best {
                break;
            }
            if text.is_char_boundary(text.len() - k)
                && s.is_char_boundary(k)
                && text.as_bytes()[text.len() - k..] == s.as_bytes()[..k]
            {
                best = k;
                break;
            }
        }
    }
    best
}

impl Seq {
    pub(super) fn send(&mut self, e: Event) {
        if self.req.tx.send(e).is_err() {
            self.finished = true;
            self.gone = true;
        }
    }

    pub(super) fn finish(&mut self, reason: &'static str, shared: &Shared) {
        if self.finished {
            return;
        }
        let f = Finish {
            reason,
            prompt_tokens: self.req.prompt.len(),
            completion_tokens: self.ids.len(),
            cached_tokens: self.cached_tokens,
            ttft: self
                .first_at
                .map(|t| t.saturating_duration_since(self.req.arrived)),
        };
        self.send(Event::Done(f));
        self.finished = true;
        if !self.gone {
            shared.completed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Take newly generated tokens; returns false when the sequence is done.
    pub(super) fn accept(&mut self, toks: &[u32], tok: &Tokenizer, shared: &Shared) -> bool {
        let now = Instant::now();
        let m = &shared.metrics;
        match self.last_at {
            None => {
                self.first_at = Some(now);
                m.ttft.observe(
                    now.saturating_duration_since(self.req.arrived)
                        .as_secs_f64(),
                );
                // Tokens after the first in the same step arrived with it.
                m.inter_token
                    .observe_n(0.0, (toks.len() as u64).saturating_sub(1));
            }
            Some(t) if !toks.is_empty() => {
                let k = toks.len() as u64;
                let gap = now.saturating_duration_since(t).as_secs_f64();
                m.inter_token.observe_n(gap / k as f64, k);
            }
            Some(_) => {}
        }
        self.last_at = Some(now);
        for &t in toks {
            if self.finished {
                return false;
            }
            if t == tok.eot() && !self.req.ignore_eos {
                self.flush_all();
                self.finish("stop", shared);
                return false;
            }
            self.ids.push(t);
            shared.generated_tokens.fetch_add(1, Ordering::Relaxed);
            let piece = match self.detok.push(tok, t) {
                Ok(t) => t,
                Err(e) => {
                    self.send(Event::Error(format!("cannot decode the output: {e:#}")));
                    self.finished = true;
                    return false;
                }
            };
            // Empty while the text ends in an incomplete character.
            if !piece.is_empty() {
                self.text.push_str(&piece);
                // A stop sequence can only end in the new text.
                let maxlen = self.req.stop.iter().map(|s| s.len()).max().unwrap_or(0);
                let mut from = self.sent.saturating_sub(maxlen);
                while !self.text.is_char_boundary(from) {
                    from -= 1;
                }
                let hit = self
                    .req
                    .stop
                    .iter()
                    .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| from + p))
                    .min();
                if let Some(p) = hit {
                    if p > self.sent {
                        let out = self.text[self.sent..p].to_string();
                        self.sent = p;
                        self.send(Event::Text(out));
                    }
                    self.finish("stop", shared);
                    return false;
                }
                let safe = self.text.len() - held_back(&self.text, &self.req.stop);
                if safe > self.sent {
                    let out = self.text[self.sent..safe].to_string();
                    self.sent = safe;
                    self.send(Event::Text(out));
                }
            }
            if self.ids.len() >= self.req.max_tokens {
                self.flush_all();
                self.finish("length", shared);
                return false;
            }
        }
        !self.finished
    }

    pub(super) fn flush_all(&mut self) {
        if self.text.len() > self.sent {
            let out = self.text[self.sent..].to_string();
            self.sent = self.text.len();
            self.send(Event::Text(out));
        }
    }
}
