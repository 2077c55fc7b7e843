//! What operators read: the Prometheus `/metrics` page, and one structured (JSON) log line per
//! finished completion or chat request.
//!
//! Metrics (text exposition format 0.0.4; every family has `# HELP` and `# TYPE`):
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `mnemo_requests_total{endpoint,status}` | counter | HTTP requests answered, by route and status (499: the client left before a non-streaming answer) |
//! | `mnemo_prompt_tokens_total` | counter | prompt tokens of requests the engine admitted |
//! | `mnemo_prompt_cached_tokens_total` | counter | of those, tokens taken from the prompt cache |
//! | `mnemo_completion_tokens_total` | counter | tokens generated |
//! | `mnemo_prefix_cache_hits_total`, `_misses_total` | counter | admissions that did / did not reuse a cached prompt prefix (counted while the cache is enabled) |
//! | `mnemo_lookup_drafted_tokens_total`, `_accepted_tokens_total` | counter | lookup-first drafts proposed / kept |
//! | `mnemo_queue_depth` | gauge | requests waiting for a batch slot |
//! | `mnemo_active_sequences` | gauge | sequences in the running batch |
//! | `mnemo_time_to_first_token_seconds` | histogram | request arrival to its first generated token |
//! | `mnemo_inter_token_latency_seconds` | histogram | gap between consecutive tokens of a sequence (a step that emits k tokens, as lookup-first decoding can, counts k gaps of 1/k of it) |
//! | `mnemo_request_duration_seconds` | histogram | completion/chat request arrival to its last event (all outcomes) |
//! | `mnemo_engine_step_seconds` | histogram | one engine step (prefill chunk and/or batched decode forward) |
//!
//! A histogram `h` is written as cumulative `h_bucket{le="…"}` lines (ending in `le="+Inf"`,
//! equal to `h_count`), then `h_sum` and `h_count`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Bucket upper bounds (seconds) of the time-to-first-token and request-duration histograms.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Bucket upper bounds (seconds) of the per-token and engine-step histograms.
pub const TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
];

/// A fixed-bucket histogram (per-bucket counts; made cumulative when written).
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistInner>,
}

#[derive(Clone)]
struct HistInner {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            inner: Mutex::new(HistInner {
                counts: vec![0; bounds.len()],
                sum: 0.0,
                count: 0,
            }),
        }
    }

    /// Record one value (seconds); values above the last bound count only in `+Inf`.
    pub fn observe(&self, x: f64) {
        self.observe_n(x, 1);
    }

    /// Record `n` values of `x`.
    pub fn observe_n(&self, x: f64, n: u64) {
        if n == 0 || !x.is_finite() {
            return;
        }
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = self.bounds.iter().position(|&b| x <= b) {
            h.counts[i] += n;
        }
        h.sum += x * n as f64;
        h.count += n;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&h.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum {}", h.sum);
        let _ = writeln!(out, "{name}_count {}", h.count);
    }
}

/// The server's metrics (the engine and the HTTP side both write them).
pub struct Metrics {
    /// `(endpoint, status)` → requests.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub prefix_misses: AtomicU64,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub duration: Histogram,
    pub step: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            prefix_misses: AtomicU64::new(0),
            ttft: Histogram::new(LATENCY_BUCKETS),
            inter_token: Histogram::new(TOKEN_BUCKETS),
            duration: Histogram::new(LATENCY_BUCKETS),
            step: Histogram::new(TOKEN_BUCKETS),
        }
    }
}

/// The routes, as the `endpoint` label names them (anything else: `other`, so a client cannot
/// grow the label set).
pub const ENDPOINTS: &[&str] = &[
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/stats",
    "/health",
    "/metrics",
];

/// The `endpoint` label of a request path.
pub fn endpoint_label(path: &str) -> &'static str {
    ENDPOINTS
        .iter()
        .find(|&&e| e == path)
        .copied()
        .unwrap_or("other")
}

/// Values the HTTP side reads from elsewhere when the page is written.
pub struct Snapshot {
    pub queue_depth: usize,
    pub active: usize,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub prefix_hits: u64,
    pub drafted: u64,
    pub accepted: u64,
}

impl Metrics {
    pub fn count_request(&self, endpoint: &'static str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((endpoint, status))
            .or_insert(0) += 1;
    }

    /// The `/metrics` page.
    pub fn render(&self, s: &Snapshot) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP mnemo_requests_total HTTP requests answered, by endpoint and status code."
        );
        let _ = writeln!(o, "# TYPE mnemo_requests_total counter");
        for ((e, st), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                o,
                "mnemo_requests_total{{endpoint=\"{e}\",status=\"{st}\"}} {n}"
            );
        }
        let counters: [(&str, &str, u64); 7] = [
            (
                "mnemo_prompt_tokens_total",
                "Prompt tokens of the requests the engine admitted.",
                self.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "mnemo_prompt_cached_tokens_total",
                "Prompt tokens taken from the prompt (prefix) cache instead of prefilled.",
                s.cached_tokens,
            ),
            (
                "mnemo_completion_tokens_total",
                "Tokens generated.",
                s.completion_tokens,
            ),
            (
                "mnemo_prefix_cache_hits_total",
                "Admitted requests that reused a cached prompt prefix.",
                s.prefix_hits,
            ),
            (
                "mnemo_prefix_cache_misses_total",
                "Admitted requests that found no reusable cached prefix (while the cache is on).",
                self.prefix_misses.load(Ordering::Relaxed),
            ),
            (
                "mnemo_lookup_drafted_tokens_total",
                "Draft tokens proposed by lookup-first decoding.",
                s.drafted,
            ),
            (
                "mnemo_lookup_accepted_tokens_total",
                "Draft tokens kept by lookup-first decoding.",
                s.accepted,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} counter");
            let _ = writeln!(o, "{name} {v}");
        }
        for (name, help, v) in [
            (
                "mnemo_queue_depth",
                "Requests waiting for a slot in the batch.",
                s.queue_depth,
            ),
            (
                "mnemo_active_sequences",
                "Sequences in the running batch (prefilling or decoding).",
                s.active,
            ),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} gauge");
            let _ = writeln!(o, "{name} {v}");
        }
        self.ttft.write(
            &mut o,
            "mnemo_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token.",
        );
        self.inter_token.write(
            &mut o,
            "mnemo_inter_token_latency_seconds",
            "Seconds between consecutive generated tokens of a sequence.",
        );
        self.duration.write(
            &mut o,
            "mnemo_request_duration_seconds",
            "Seconds from a completion or chat request's arrival to its last event.",
        );
        self.step.write(
            &mut o,
            "mnemo_engine_step_seconds",
            "Seconds per engine step (a prefill chunk and/or one batched decode forward).",
        );
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_end_in_inf() {
        let h = Histogram::new(&[0.25, 1.0]);
        for x in [0.0625, 0.5, 0.75, 3.0] {
            h.observe(x);
        }
        h.observe_n(0.125, 2);
        let mut s = String::new();
        h.write(&mut s, "x", "help");
        let want = "# HELP x help\n# TYPE x histogram\nx_bucket{le=\"0.25\"} 3\n\
                    x_bucket{le=\"1\"} 5\nx_bucket{le=\"+Inf\"} 6\nx_sum 4.5625\nx_count 6\n";
        assert_eq!(s, want);
        assert_eq!(endpoint_label("/v1/completions"), "/v1/completions");
        assert_eq!(endpoint_label("/etc/passwd"), "other");
    }
}
