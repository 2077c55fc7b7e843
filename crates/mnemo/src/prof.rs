//! Named wall-clock spans: where a training step's time goes, phase by phase.
//!
//! ```text
//! let _s = prof::span("attn.fwd");   // … the work …   (dropped: its time is added)
//! prof::take()  →  [("attn.fwd", total ms, calls), …]   in first-seen order
//! ```
//!
//! Off by default: a span then costs one relaxed atomic load and records nothing. Spans are
//! meant for the driver's thread (a sublayer's call, a whole backward): the work inside may
//! run in parallel, and its wall time is what the span measures. Spans nest; an outer span's
//! time includes its inner spans' (the reader subtracts). `mnemo bench train-step --profile`
//! turns them on and prints the medians per step.
//!
//! Separately, the GEMM log ([`log_gemms`], kept in `kernels::gemm_log` since the products
//! record into it) records every matrix product's shape and wall time: what the step's
//! products would cost at best, shape by shape (`bench train-step --profile`'s `gemm_floor`).

pub use crate::kernels::gemm_log::{gemm, log_gemms, take_gemms, GemmShape, GemmSpan};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ON: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Vec<(&'static str, f64, u64)>> = Mutex::new(Vec::new());
/// Turn span recording on or off (process-wide).
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether spans record.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// A running span; its time is added to its name's total when it is dropped.
#[must_use = "a span measures until it is dropped"]
pub struct Span {
    name: &'static str,
    t0: Option<Instant>,
}

/// Start the span `name` (records nothing unless [`enable`]d).
pub fn span(name: &'static str) -> Span {
    Span {
        name,
        t0: enabled().then(Instant::now),
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(t0) = self.t0 {
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut t = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
            match t.iter_mut().find(|(n, _, _)| *n == self.name) {
                Some(e) => {
                    e.1 += ms;
                    e.2 += 1;
                }
                None => t.push((self.name, ms, 1)),
            }
        }
    }
}

/// The totals since the last call (name, milliseconds, calls), in first-seen order; resets them.
pub fn take() -> Vec<(&'static str, f64, u64)> {
    std::mem::take(&mut *TOTALS.lock().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_add_up_by_name_only_when_enabled() {
        // The totals are process-wide and other tests' model code records spans while this
        // one has them on: only this test's names are looked at.
        let mine = |t: Vec<(&'static str, f64, u64)>| {
            t.into_iter()
                .filter(|e| e.0.starts_with("prof.test."))
                .collect::<Vec<_>>()
        };
        enable(false);
        drop(span("prof.test.off"));
        assert!(mine(take()).is_empty());
        enable(true);
        for _ in 0..3 {
            let _s = span("prof.test.a");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        drop(span("prof.test.b"));
        enable(false);
        let t = mine(take());
        let calls: Vec<_> = t.iter().map(|e| (e.0, e.2)).collect();
        assert_eq!(calls, [("prof.test.a", 3), ("prof.test.b", 1)]);
        assert!(t[0].1 >= 6.0, "{t:?}");
        assert!(mine(take()).is_empty());
    }
}
