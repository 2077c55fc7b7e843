//! The prompt (prefix) cache and the prefill schedule that keeps reused rows exact.
//!
//! Recent long prompts keep their decode state (K/V rows; DeepSeek-V4: the window ring,
//! compressed entries and indexer keys) in memory and optionally on disk; a new prompt reuses
//! the longest common prefix with any of them and prefills only the rest.
//!
//! Every prompt row keeps the arithmetic of a fresh prefill (`decode::Plan`, the one rule of
//! docs/model-block.md): on a quantised model every row, prompt or decode, runs on the
//! quantised blocks exactly as one-token decoding does, so chunk lengths change a row only by
//! f32 rounding (the attention's summation order). The schedule still reproduces a fresh
//! prefill's chunk shape (`generate`, `ask`: chunks of `PREFILL_CHUNK` from position 0 have a
//! chunk of one row only at the end, when `(len − 1) mod PREFILL_CHUNK = 0`): the engine
//! prefills in chunks of any length (bounded per step, [`next_chunk`]) with the same property,
//! every chunk at least two rows except the last, which has one exactly when the fresh
//! prefill's has.
//!
//! A DeepSeek-V4 state forgets window rows as it moves on, so it can be cut back only
//! `V4_ROLLBACK` positions: a prompt that leaves a cached one earlier cannot reuse it. When
//! a new prompt shares a long prefix with a cached one that it cannot reuse this way, its
//! prefill stops at the end of that shared prefix and keeps the state there as an entry of its
//! own ([`Engine::snapshot_point`]): a third prompt with that prefix (a shared system prompt)
//! reuses it.

use super::seq::Seq;
use super::Engine;
use mnemo::generate::{KvCache, PREFILL_CHUNK};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

/// Prompt-cache hits reuse at least this many tokens.
pub(super) const MIN_REUSE: usize = 16;

pub(super) struct PrefixEntry {
    pub(super) tokens: Vec<u32>,
    pub(super) cache: KvCache,
    pub(super) used: u64,
}

/// Whether a fresh prefill of `len` tokens runs its last row as a chunk of its own.
pub(super) fn fresh_alone(len: usize) -> bool {
    len > 0 && (len - 1).is_multiple_of(PREFILL_CHUNK)
}

/// How many of a prompt's `len` tokens to reuse from a prompt-cache entry of `entry_len`
/// tokens that matches its first `lcp`, so that the rest can be prefilled by [`next_chunk`]
/// with the rows of a fresh prefill (module docs): at least one token is left to run, the
/// entry's last row is not reused where it ran alone, and the rows left are not two when the
/// last runs alone (they would be two chunks of one) nor one when it does not.
pub(super) fn reusable(len: usize, lcp: usize, entry_len: usize) -> usize {
    let mut n = lcp.min(len.saturating_sub(1)).min(entry_len);
    if n > 0 && n == entry_len && fresh_alone(entry_len) {
        n -= 1;
    }
    let rest = len - n;
    // (n > 0 in both cases: with n = 0, rest = 2 is not alone and rest = 1 is.)
    if (fresh_alone(len) && rest == 2) || (!fresh_alone(len) && rest == 1) {
        n -= 1;
    }
    n
}

/// The rows of the next prefill chunk of a prompt with `rem` rows left (`alone_last`: its
/// last row runs alone), at most `max` (≥ 3; smaller is raised to 3), never leaving a part
/// that would need a chunk of one row before the last. Rows before a snapshot point count as
/// a prompt of their own whose last row does not run alone.
pub(super) fn next_chunk(rem: usize, alone_last: bool, max: usize) -> usize {
    let max = max.max(3);
    let body = match alone_last {
        true if rem == 1 => return 1,
        true => rem - 1,
        false => rem,
    };
    if body <= max {
        body
    } else if body - max == 1 {
        max - 1
    } else {
        max
    }
}

impl Engine {
    pub(super) fn load_prefixes(&mut self) {
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
                    let msg = format!(
                        "prompt cache: loaded {} ({} tokens)",
                        p.display(),
                        tokens.len()
                    );
                    tracing::info!("{msg}");
                    eprintln!("{msg}");
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

    /// Fill `cache` with the longest reusable cached prefix of `p`: the entries in order of
    /// the rows they would give, the first whose state can be cut to them (a DeepSeek-V4
    /// state only near its end). Returns the rows reused (0: none, a miss).
    pub(super) fn take_prefix(&mut self, p: &[u32], cache: &mut KvCache) -> usize {
        let mut cands: Vec<(usize, usize)> = self
            .prefixes
            .iter()
            .enumerate()
            .map(|(i, e)| (reusable(p.len(), lcp(&e.tokens, p), e.tokens.len()), i))
            .filter(|&(n, _)| n >= MIN_REUSE)
            .collect();
        cands.sort_by_key(|c| std::cmp::Reverse(c.0));
        for (n, i) in cands {
            if cache.copy_prefix_from(&self.prefixes[i].cache, n).is_ok() {
                self.clock += 1;
                self.prefixes[i].used = self.clock;
                return n;
            }
        }
        0
    }

    /// Where the prefill of `p` (reusing `done` rows) should stop to keep its state as an
    /// entry of its own: the end of the longest prefix it shares with a cached prompt beyond
    /// what it reuses, when that is long enough to keep and the rows after it can still be
    /// prefilled as a fresh prefill runs them (module docs). Only DeepSeek-V4 models need it
    /// (other caches can be cut anywhere).
    pub(super) fn snapshot_point(&self, p: &[u32], done: usize) -> Option<usize> {
        if self.model.cfg.v4.is_none() || self.cfg.prefix_max_entries == 0 {
            return None;
        }
        let s = self
            .prefixes
            .iter()
            .map(|e| lcp(&e.tokens, p))
            .max()?
            .min(p.len().saturating_sub(1));
        let rest = p.len() - s;
        let rest_ok = match fresh_alone(p.len()) {
            true => rest != 2,
            false => rest >= 2,
        };
        (s >= self.cfg.prefix_min_tokens.max(MIN_REUSE) && s >= done + 2 && rest_ok).then_some(s)
    }

    /// Keep the state of a long prompt (`tokens`, the first positions of `src`) for later
    /// requests.
    pub(super) fn remember(&mut self, tokens: &[u32], src: &KvCache) {
        let p = tokens;
        if self.cfg.prefix_max_entries == 0 || p.len() < self.cfg.prefix_min_tokens {
            return;
        }
        // A DeepSeek-V4 state cannot be cut back far: there, a longer entry does not cover a
        // shorter one.
        let v4 = self.model.cfg.v4.is_some();
        let covers = |long: &[u32], short: &[u32]| {
            long.len() >= short.len()
                && long[..short.len()] == short[..]
                && (!v4 || long.len() == short.len())
        };
        if self.prefixes.iter().any(|e| covers(&e.tokens, p)) {
            return;
        }
        let mut cache = KvCache::with_capacity(&self.model, p.len());
        if cache.copy_prefix_from(src, p.len()).is_err() {
            return;
        }
        if let Some(dir) = &self.cfg.prefix_dir {
            // Written by a helper thread from its own copy, so decoding does not wait.
            let bytes: Vec<u8> = p.iter().flat_map(|x| x.to_le_bytes()).collect();
            let key = mnemo::util::fnv1a64(&bytes);
            let path = dir.join(format!("{key:016x}.safetensors"));
            let mut copy = KvCache::with_capacity(&self.model, p.len());
            if copy.copy_prefix_from(&cache, p.len()).is_ok() {
                let (model, tokens) = (self.model.clone(), p.to_vec());
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
        self.prefixes.retain(|e| !covers(p, &e.tokens));
        self.clock += 1;
        self.prefixes.push(PrefixEntry {
            tokens: p.to_vec(),
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

    /// [`Self::remember`] for a sequence whose prompt is prefilled.
    pub(super) fn remember_prompt(&mut self, s: &Seq) {
        self.remember(&s.req.prompt, &s.cache);
    }
}

/// The length of the longest common prefix of `a` and `b`.
pub(super) fn lcp(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
