//! The engine thread: owns the model, runs continuous batching.
//!
//! Requests arrive over a bounded channel (the HTTP side answers 429 when it is full). Between
//! decode steps, waiting requests join (up to `max_batch` active sequences) and finished or
//! abandoned ones leave: a sequence whose client has gone (its event receiver dropped) is
//! freed before the next step. Each step runs one chunk of prefill for a newly joined
//! sequence (its own forward, so decode rows keep their exact arithmetic), then one batched
//! decode forward over all decoding sequences ([`mnemo::batch::forward_batch`]): each
//! contributes its pending token and, with lookup-first decoding, its draft tokens.
//!
//! The prompt cache keeps the K/V of recent long prompts in memory (and optionally on disk);
//! a new prompt reuses the longest common prefix with any of them and prefills only the rest.

use mnemo::batch::{forward_batch, BatchSeq};
use mnemo::generate::{KvCache, Sampling, PREFILL_CHUNK};
use mnemo::lookup::{LookupConfig, SeqDecoder};
use mnemo::model::Model;
use mnemo::tokenizer::{DecodeState, Tokenizer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_batch: usize,
    /// K/V positions per sequence.
    pub ctx: usize,
    /// Lookup-first decoding settings, used by requests that ask for it (`"mnemo":
    /// {"lookup": true}`) and, with `lookup_default`, by those that do not say.
    pub lookup: LookupConfig,
    pub lookup_default: bool,
    /// Prompts at least this long are kept in the prompt cache.
    pub prefix_min_tokens: usize,
    pub prefix_max_entries: usize,
    pub prefix_dir: Option<PathBuf>,
    /// Size limit of the files in `prefix_dir` (least recently used deleted first).
    pub prefix_dir_limit: u64,
    /// After shutdown starts, active sequences get this long to finish.
    pub shutdown_grace: Duration,
    /// Testing aid: sleep this long after every step.
    pub step_delay: Duration,
}

/// Counters shared with the HTTP side.
#[derive(Default)]
pub struct Shared {
    pub shutdown: AtomicBool,
    pub shutdown_at: Mutex<Option<Instant>>,
    pub active: AtomicUsize,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub rejected: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub steps: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub prefix_entries: AtomicUsize,
    pub cached_tokens: AtomicU64,
    pub drafted: AtomicU64,
    pub accepted: AtomicU64,
    pub exited: AtomicBool,
    /// Prometheus metrics and histograms (see [`super::metrics`]).
    pub metrics: super::metrics::Metrics,
}

impl Shared {
    pub fn begin_shutdown(&self) {
        if !self.shutdown.swap(true, Ordering::SeqCst) {
            *self.shutdown_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    }
}

struct PrefixEntry {
    tokens: Vec<u32>,
    cache: KvCache,
    used: u64,
}

enum Phase {
    /// Prompt positions `..done` are in the cache.
    Prefill {
        done: usize,
    },
    Decode,
}

struct Seq {
    req: Request,
    cache: KvCache,
    dec: SeqDecoder,
    phase: Phase,
    ids: Vec<u32>,
    /// Incremental detokeniser of `ids` (decodes a short window per token).
    detok: DecodeState,
    /// Text of `ids` so far (complete characters), `text[..sent]` sent.
    text: String,
    sent: usize,
    cached_tokens: usize,
    /// When the first token, and the latest, were generated.
    first_at: Option<Instant>,
    last_at: Option<Instant>,
    finished: bool,
    /// The client has gone (its receiver was dropped).
    gone: bool,
}

/// How many of a prompt's `len` tokens to reuse from a prompt-cache entry of `entry_len`
/// tokens that matches its first `lcp` (at most `len - 1`), so that every prompt row keeps
/// the arithmetic of a fresh prefill (`decode::Plan`, the one rule of docs/model-block.md):
/// a prefill chunk of a single token runs on a quantised model's quantised blocks (as
/// one-token decoding does), a longer one on the f32 weights. A fresh prefill (chunks of
/// `PREFILL_CHUNK` from position 0, as `generate` and `ask` run it) has one only when its last
/// chunk is one token long; the rows after the reused ones are prefilled in chunks from the
/// first of them, and the entry's rows came from its own prefill.
fn reusable(len: usize, lcp: usize, entry_len: usize) -> usize {
    let c = PREFILL_CHUNK;
    let mut n = lcp.min(len.saturating_sub(1));
    // The entry's last row ran alone when it ended a chunk of one token; here it is not last.
    if n > 0 && n == entry_len && (entry_len - 1).is_multiple_of(c) {
        n -= 1;
    }
    let alone_fresh = len > 0 && (len - 1).is_multiple_of(c);
    let alone_here = len > n && (len - 1 - n).is_multiple_of(c);
    if alone_here && !alone_fresh {
        // (n > 0: with n = 0 both are the same.) Two rows then run as the last chunk.
        n -= 1;
    } else if alone_fresh && !alone_here {
        n -= n % c;
    }
    n
}

/// The longest suffix of `text` that is a proper prefix of one of `stops` (held back).
fn held_back(text: &str, stops: &[String]) -> usize {
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
    fn send(&mut self, e: Event) {
        if self.req.tx.send(e).is_err() {
            self.finished = true;
            self.gone = true;
        }
    }

    fn finish(&mut self, reason: &'static str, shared: &Shared) {
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
    fn accept(&mut self, toks: &[u32], tok: &Tokenizer, shared: &Shared) -> bool {
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

    fn flush_all(&mut self) {
        if self.text.len() > self.sent {
            let out = self.text[self.sent..].to_string();
            self.sent = self.text.len();
            self.send(Event::Text(out));
        }
    }
}

pub struct Engine {
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    cfg: EngineConfig,
    shared: Arc<Shared>,
    prefixes: Vec<PrefixEntry>,
    clock: u64,
    /// Prompt-cache files being written (joined before the engine exits).
    saving: Vec<std::thread::JoinHandle<()>>,
}

impl Engine {
    pub fn new(
        model: Arc<Model>,
        tok: Arc<Tokenizer>,
        cfg: EngineConfig,
        shared: Arc<Shared>,
    ) -> Self {
        let mut e = Engine {
            model,
            tok,
            cfg,
            shared,
            prefixes: Vec::new(),
            clock: 0,
            saving: Vec::new(),
        };
        e.load_prefixes();
        e
    }

    fn load_prefixes(&mut self) {
        let Some(dir) = self.cfg.prefix_dir.clone() else {
            return;
        };
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
            .collect();
        files.sort();
        files.reverse();
        for (_, p) in files.into_iter().take(self.cfg.prefix_max_entries) {
            match KvCache::load(&p, &self.model) {
                Ok((cache, tokens)) => {
                    tracing::info!(
                        "prompt cache: loaded {} ({} tokens)",
                        p.display(),
                        tokens.len()
                    );
                    eprintln!(
                        "prompt cache: loaded {} ({} tokens)",
                        p.display(),
                        tokens.len()
                    );
                    self.prefixes.push(PrefixEntry {
                        tokens,
                        cache,
                        used: 0,
                    });
                }
                Err(e) => eprintln!("prompt cache: skipping {}: {e:#}", p.display()),
            }
        }
        self.shared
            .prefix_entries
            .store(self.prefixes.len(), Ordering::Relaxed);
    }

    /// Start a sequence: reuse the longest cached prefix of its prompt.
    fn admit(&mut self, req: Request) -> Option<Seq> {
        if req.tx.is_closed() {
            self.shared.cancelled.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut cache = KvCache::with_capacity(&self.model, self.cfg.ctx);
        let p = &req.prompt;
        let mut best: Option<(usize, usize)> = None;
        for (i, e) in self.prefixes.iter().enumerate() {
            let lcp = e
                .tokens
                .iter()
                .zip(p.iter())
                .take_while(|(a, b)| a == b)
                .count();
            // At least one prompt token must be run to get the next token's logits, and the
            // rows run after the reused ones must be computed as a fresh prefill computes them.
            let lcp = reusable(p.len(), lcp, e.tokens.len());
            if lcp > best.map_or(0, |b| b.1) {
                best = Some((i, lcp));
            }
        }
        let mut done = 0;
        self.shared
            .metrics
            .prompt_tokens
            .fetch_add(p.len() as u64, Ordering::Relaxed);
        if let Some((i, n)) = best {
            if n >= 16 && cache.copy_prefix_from(&self.prefixes[i].cache, n).is_ok() {
                self.clock += 1;
                self.prefixes[i].used = self.clock;
                done = n;
                self.shared.prefix_hits.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .cached_tokens
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        if done == 0 && self.cfg.prefix_max_entries > 0 {
            self.shared
                .metrics
                .prefix_misses
                .fetch_add(1, Ordering::Relaxed);
        }
        let lookup = req
            .lookup
            .unwrap_or(self.cfg.lookup_default)
            .then_some(self.cfg.lookup);
        let dec = SeqDecoder::new(
            p,
            req.sampling,
            req.seed,
            self.tok.vocab_size().min(self.model.cfg.vocab_size),
            lookup,
        );
        Some(Seq {
            req,
            cache,
            dec,
            phase: Phase::Prefill { done },
            ids: Vec::new(),
            detok: DecodeState::default(),
            text: String::new(),
            sent: 0,
            cached_tokens: done,
            first_at: None,
            last_at: None,
            finished: false,
            gone: false,
        })
    }

    /// Keep the K/V of a long prompt for later requests.
    fn remember(&mut self, s: &Seq) {
        let p = &s.req.prompt;
        if self.cfg.prefix_max_entries == 0 || p.len() < self.cfg.prefix_min_tokens {
            return;
        }
        if self
            .prefixes
            .iter()
            .any(|e| e.tokens.len() >= p.len() && e.tokens[..p.len()] == p[..])
        {
            return;
        }
        let mut cache = KvCache::with_capacity(&self.model, p.len());
        if cache.copy_prefix_from(&s.cache, p.len()).is_err() {
            return;
        }
        if let Some(dir) = &self.cfg.prefix_dir {
            // Written by a helper thread from its own copy, so decoding does not wait.
            let bytes: Vec<u8> = p.iter().flat_map(|x| x.to_le_bytes()).collect();
            let key = mnemo::util::fnv1a64(&bytes);
            let path = dir.join(format!("{key:016x}.safetensors"));
            let mut copy = KvCache::with_capacity(&self.model, p.len());
            if copy.copy_prefix_from(&cache, p.len()).is_ok() {
                let (model, tokens) = (self.model.clone(), p.clone());
                let (dir, limit) = (dir.clone(), self.cfg.prefix_dir_limit);
                self.saving.retain(|h| !h.is_finished());
                self.saving.push(std::thread::spawn(move || {
                    if let Err(e) = copy.save(&path, &model, &tokens) {
                        eprintln!("prompt cache: cannot save {}: {e:#}", path.display());
                        return;
                    }
                    for (p, _) in crate::cache_cmd::evict(&dir, limit, Some(&path)) {
                        eprintln!(
                            "prompt cache: deleted {} (over the size limit)",
                            p.display()
                        );
                    }
                }));
            }
        }
        // Drop entries this one extends, then the least recently used beyond the limit.
        self.prefixes
            .retain(|e| !(e.tokens.len() <= p.len() && p[..e.tokens.len()] == e.tokens[..]));
        self.clock += 1;
        self.prefixes.push(PrefixEntry {
            tokens: p.clone(),
            cache,
            used: self.clock,
        });
        while self.prefixes.len() > self.cfg.prefix_max_entries {
            let (i, _) = self
                .prefixes
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .expect("non-empty");
            self.prefixes.remove(i);
        }
        self.shared
            .prefix_entries
            .store(self.prefixes.len(), Ordering::Relaxed);
    }

    /// The decode loop; returns when the request channel is closed and nothing is active, or
    /// shutdown has begun and nothing is active.
    pub fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut active: Vec<Seq> = Vec::new();
        loop {
            let shutting = self.shared.shutdown.load(Ordering::SeqCst);
            // Join: waiting requests, up to the batch size.
            while active.len() < self.cfg.max_batch {
                match rx.try_recv() {
                    Ok(r) => {
                        if let Some(s) = self.admit(r) {
                            active.push(s);
                        }
                    }
                    Err(_) => break,
                }
            }
            if active.is_empty() {
                if shutting {
                    break;
                }
                // Idle: wait for a request (woken by the HTTP side; shutdown is polled every 50 ms).
                match rx.try_recv() {
                    Ok(r) => {
                        if let Some(s) = self.admit(r) {
                            active.push(s);
                        }
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        // The HTTP side unparks this thread after queueing a request.
                        std::thread::park_timeout(Duration::from_millis(50));
                        continue;
                    }
                }
            }
            // Past the shutdown grace period: end what is left, cleanly.
            if shutting {
                let at = *self
                    .shared
                    .shutdown_at
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if at.is_some_and(|t| t.elapsed() >= self.cfg.shutdown_grace) {
                    for s in active.iter_mut() {
                        s.flush_all();
                        s.send(Event::Error(
                            "the server is shutting down; the generation was cut short".into(),
                        ));
                        s.finished = true;
                    }
                    active.clear();
                    while let Ok(r) = rx.try_recv() {
                        let _ =
                            r.tx.send(Event::Error("the server is shutting down".into()));
                    }
                    self.shared.active.store(0, Ordering::Relaxed);
                    continue;
                }
            }
            // Leave: clients that have gone.
            active.retain(|s| {
                let gone = s.req.tx.is_closed();
                if gone {
                    self.shared.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                !gone
            });
            self.shared.active.store(active.len(), Ordering::Relaxed);
            if active.is_empty() {
                continue;
            }
            let t0 = Instant::now();
            self.step(&mut active);
            self.shared.metrics.step.observe(t0.elapsed().as_secs_f64());
            let cancelled = active.iter().filter(|s| s.gone).count();
            self.shared
                .cancelled
                .fetch_add(cancelled as u64, Ordering::Relaxed);
            active.retain(|s| !s.finished);
            self.shared.active.store(active.len(), Ordering::Relaxed);
            self.shared.steps.fetch_add(1, Ordering::Relaxed);
            if !self.cfg.step_delay.is_zero() {
                std::thread::sleep(self.cfg.step_delay);
            }
        }
        for h in self.saving.drain(..) {
            let _ = h.join();
        }
        self.shared.exited.store(true, Ordering::SeqCst);
    }

    fn step(&mut self, active: &mut [Seq]) {
        let model = self.model.clone();
        let tok = self.tok.clone();
        // One prefill chunk for the first sequence still prefilling.
        if let Some(i) = active
            .iter()
            .position(|s| matches!(s.phase, Phase::Prefill { .. }))
        {
            let s = &mut active[i];
            let Phase::Prefill { done } = s.phase else {
                unreachable!()
            };
            let end = (done + PREFILL_CHUNK).min(s.req.prompt.len());
            let chunk = s.req.prompt[done..end].to_vec();
            let mut b = [BatchSeq {
                tokens: &chunk,
                cache: &mut s.cache,
                logits_from: chunk.len() - 1,
            }];
            match forward_batch(&model, &mut b) {
                Ok(mut l) => {
                    if end == s.req.prompt.len() {
                        let logits = l.pop().unwrap_or_default();
                        let t = s.dec.start(&logits);
                        s.phase = Phase::Decode;
                        // The first token goes out before the prompt is remembered.
                        s.accept(&[t], &tok, &self.shared);
                        self.remember(&active[i]);
                    } else {
                        s.phase = Phase::Prefill { done: end };
                    }
                }
                Err(e) => {
                    s.send(Event::Error(format!("{e:#}")));
                    s.finished = true;
                }
            }
        }
        // One batched decode step for every decoding sequence.
        let mut feeds: Vec<(usize, Vec<u32>)> = Vec::new();
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
            feeds.push((i, f));
        }
        if feeds.is_empty() {
            return;
        }
        let mut want: Vec<usize> = Vec::new();
        let mut batch: Vec<BatchSeq> = Vec::new();
        {
            let mut fi = feeds.iter().peekable();
            for (i, s) in active.iter_mut().enumerate() {
                if fi.peek().map(|f| f.0) != Some(i) {
                    continue;
                }
                let (_, f) = fi.next().expect("peeked");
                want.push(i);
                batch.push(BatchSeq {
                    tokens: f,
                    cache: &mut s.cache,
                    logits_from: s.dec.logits_from(),
                });
            }
        }
        let res = forward_batch(&model, &mut batch);
        drop(batch);
        match res {
            Ok(logits) => {
                for (&i, l) in want.iter().zip(logits) {
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
            Err(e) => {
                for &i in &want {
                    active[i].send(Event::Error(format!("{e:#}")));
                    active[i].finished = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{held_back, reusable};
    use mnemo::generate::PREFILL_CHUNK;

    /// The chunk lengths of prefilling `len` tokens after `n` reused ones.
    fn chunks(len: usize, n: usize) -> Vec<usize> {
        (n..len)
            .step_by(PREFILL_CHUNK)
            .map(|s| (len - s).min(PREFILL_CHUNK))
            .collect()
    }

    /// Whether the prompt rows after the reused ones contain a chunk of one token, and whether
    /// the entry's reused rows do: neither differs from a fresh prefill of the prompt.
    #[test]
    fn reused_prefixes_keep_the_rows_of_a_fresh_prefill() {
        let c = PREFILL_CHUNK;
        for len in [2, 17, 40, c, c + 1, c + 2, 2 * c, 2 * c + 1, 3 * c - 1] {
            let fresh_alone = chunks(len, 0).last() == Some(&1);
            for entry_len in [1, 16, 39, c, c + 1, c + 2, 2 * c + 1, 3 * c] {
                for lcp in 0..=entry_len.min(len) {
                    let n = reusable(len, lcp, entry_len);
                    assert!(n <= lcp && n < len, "{len} {lcp} {entry_len}: {n}");
                    let ch = chunks(len, n);
                    assert!(ch[..ch.len() - 1].iter().all(|&k| k > 1));
                    assert_eq!(
                        ch.last() == Some(&1),
                        fresh_alone,
                        "{len} {lcp} {entry_len}"
                    );
                    let entry_alone = chunks(entry_len, 0).last() == Some(&1);
                    assert!(!(entry_alone && n == entry_len), "{len} {lcp} {entry_len}");
                    // Little is given up: one row, or (1 in 256 prompts) down to a chunk start.
                    assert!(
                        n + 1 >= lcp.min(len - 1) || fresh_alone,
                        "{len} {lcp} {entry_len}"
                    );
                }
            }
        }
        // A repeated prompt of 40 tokens: 38 reused, the last two prefilled together.
        assert_eq!(reusable(40, 39, 40), 38);
        // A longer prompt after a cached one: all of the cached one.
        assert_eq!(reusable(45, 40, 40), 40);
    }

    #[test]
    fn holds_back_a_partial_stop_sequence() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abcEN", &stops), 2);
        assert_eq!(held_back("abc", &stops), 0);
        assert_eq!(held_back("é", &["éx".to_string()]), 2);
    }
}
