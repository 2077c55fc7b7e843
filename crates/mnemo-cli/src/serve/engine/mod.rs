//! The engine thread: owns the model, runs continuous batching.
//!
//! Requests arrive over a bounded channel (the HTTP side answers 429 when it is full). Between
//! steps, waiting requests join (up to `max_batch` active sequences, in arrival order) and
//! finished or abandoned ones leave: a sequence whose client has gone (its event receiver
//! dropped) is freed before the next step. Each step is one batched forward over the rows of
//! every active sequence: a bounded prefill chunk of the oldest sequence still prefilling and
//! the pending token (with lookup-first decoding, also the drafts) of every decoding one
//! (module [`step`]), so every weight block is read once per step for all of them.
//!
//! Files: [`seq`] (a request's sequence: events, stop sequences, text), [`prefix`] (the
//! prompt cache and the prefill chunk schedule), [`step`] (one step).

mod prefix;
mod seq;
mod step;
#[cfg(test)]
mod tests;

pub use seq::{Event, Finish, Request};

use mnemo::generate::KvCache;
use mnemo::lookup::{LookupConfig, SeqDecoder};
use mnemo::model::Model;
use mnemo::tokenizer::{DecodeState, Tokenizer};
use prefix::PrefixEntry;
use seq::{Phase, Seq};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_batch: usize,
    /// K/V positions per sequence.
    pub ctx: usize,
    /// Prompt rows a step prefills at most while other sequences decode (alone: up to
    /// `PREFILL_CHUNK`); at least 3.
    pub prefill_chunk: usize,
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

pub struct Engine {
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    cfg: EngineConfig,
    shared: Arc<Shared>,
    prefixes: Vec<PrefixEntry>,
    clock: u64,
    /// Prompt-cache files being written (joined before the engine exits).
    saving: Vec<std::thread::JoinHandle<()>>,
    /// Steps run so far.
    steps: u64,
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
            steps: 0,
        };
        e.load_prefixes();
        e
    }

    /// Start a sequence: reuse the longest cached prefix of its prompt.
    fn admit(&mut self, req: Request) -> Option<Seq> {
        if req.tx.is_closed() {
            self.shared.cancelled.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut cache = KvCache::with_capacity(&self.model, self.cfg.ctx);
        let p = &req.prompt;
        self.shared
            .metrics
            .prompt_tokens
            .fetch_add(p.len() as u64, Ordering::Relaxed);
        let done = self.take_prefix(p, &mut cache);
        if done > 0 {
            self.shared.prefix_hits.fetch_add(1, Ordering::Relaxed);
            self.shared
                .cached_tokens
                .fetch_add(done as u64, Ordering::Relaxed);
        } else if self.cfg.prefix_max_entries > 0 {
            self.shared
                .metrics
                .prefix_misses
                .fetch_add(1, Ordering::Relaxed);
        }
        let phase = Phase::Prefill {
            done,
            alone_last: prefix::fresh_alone(p.len()),
            snap: self.snapshot_point(p, done),
        };
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
            phase,
            ids: Vec::new(),
            detok: DecodeState::default(),
            text: String::new(),
            sent: 0,
            cached_tokens: done,
            first_at: None,
            last_at: None,
            finished: false,
            gone: false,
            turn: 0,
        })
    }

    /// The decode loop; returns when the request channel is closed and nothing is active, or
    /// shutdown has begun and nothing is active.
    pub fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut active: Vec<Seq> = Vec::new();
        loop {
            let shutting = self.shared.shutdown.load(Ordering::SeqCst);
            self.join(&mut rx, &mut active);
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
            self.tick(&mut active);
            if !self.cfg.step_delay.is_zero() {
                std::thread::sleep(self.cfg.step_delay);
            }
        }
        for h in self.saving.drain(..) {
            let _ = h.join();
        }
        self.shared.exited.store(true, Ordering::SeqCst);
    }

    /// Waiting requests join, in arrival order, up to the batch size.
    fn join(&mut self, rx: &mut mpsc::Receiver<Request>, active: &mut Vec<Seq>) {
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
    }

    /// Sequences whose clients have gone leave; one step; finished ones leave.
    fn tick(&mut self, active: &mut Vec<Seq>) {
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
            return;
        }
        let t0 = Instant::now();
        self.step(active);
        self.shared.metrics.step.observe(t0.elapsed().as_secs_f64());
        let cancelled = active.iter().filter(|s| s.gone).count();
        self.shared
            .cancelled
            .fetch_add(cancelled as u64, Ordering::Relaxed);
        active.retain(|s| !s.finished);
        self.shared.active.store(active.len(), Ordering::Relaxed);
        self.shared.steps.fetch_add(1, Ordering::Relaxed);
    }
}
